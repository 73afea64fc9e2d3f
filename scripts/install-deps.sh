#!/usr/bin/env bash
# Installs what building and testing Ferry needs on a Debian 12 host, and nothing that is
# already there. Run as root (or with sudo available). Idempotent and quick when all is present.
#   install-deps.sh          build and test (pjdfstest included, by cargo install)
#   install-deps.sh --bench  also what `make bench` compares against and measures with:
#                            passt, iperf3, fio, gnuplot, and virtiofsd (cargo install)
set -euo pipefail
BENCH=0
[ "${1:-}" = --bench ] && BENCH=1

# command -> Debian package that provides it
declare -A NEED=(
	[qemu-system-x86_64]=qemu-system-x86
	[cpio]=cpio
	[gzip]=gzip
	[readelf]=binutils
	[dpkg-deb]=dpkg
	[ip]=iproute2
	[cc]=gcc
	[ping]=iputils-ping
	[curl]=curl
	[python3]=python3
	[setpriv]=util-linux
	[systemd-socket-activate]=systemd
	[man]=man-db
	[objdump]=binutils
	# `promtool check metrics` checks GET /metrics (tests/tests/guest_flows.rs).
	[promtool]=prometheus
	# `ferry ctl pcap | tcpdump -r -` (tests/tests/guest_audit.rs).
	[tcpdump]=tcpdump
	# The corporate proxy of tests/tests/guest_proxy_upstream.rs, and its htpasswd file
	# and TLS test certificate.
	[openssl]=openssl
	# kinit, for the Kerberos realm of the same test.
	[kinit]=krb5-user
	# A guest test that times out prints where each of ferry's threads is (tests/src/ferry.rs).
	[gdb]=gdb
	# setfacl and getfacl, on the host and (through the tools share) in the guest:
	# tests/tests/guest_acl.rs.
	[setfacl]=acl
)
if [ $BENCH = 1 ]; then
	NEED[passt]=passt
	NEED[iperf3]=iperf3
	NEED[fio]=fio
	NEED[gnuplot]=gnuplot-nox
	NEED[pkg-config]=pkg-config
fi

missing=()
for cmd in "${!NEED[@]}"; do
	command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done

# squid installs to /usr/sbin, which a non-root PATH lacks: checked by file. So do the
# Kerberos test realm's KDC and the tool that makes its database and keytabs.
[ -x /usr/sbin/squid ] || missing+=(squid)
[ -x /usr/sbin/krb5kdc ] || missing+=(krb5-kdc)
[ -x /usr/sbin/kadmin.local ] || missing+=(krb5-admin-server)
# The proxy's Negotiate links MIT krb5's GSSAPI; the bindings are generated from its header
# by bindgen, which needs libclang.
[ -e /usr/include/gssapi/gssapi.h ] || missing+=(libkrb5-dev)
compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || missing+=(libclang-dev)
# The guest tests' probe is linked statically against glibc.
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
# virtiofsd (built below for the benchmark) links libseccomp and libcap-ng.
if [ $BENCH = 1 ]; then
	[ -e /usr/include/seccomp.h ] || missing+=(libseccomp-dev)
	[ -e /usr/include/cap-ng.h ] || missing+=(libcap-ng-dev)
fi

if [ ${#missing[@]} -gt 0 ]; then
	SUDO=
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null || { echo "install-deps: need root to install ${missing[*]}; run as root or install sudo" >&2; exit 1; }
		SUDO=sudo
	fi
	echo "install-deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -q
	$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The libvirt end-to-end test's daemon and virsh, from bookworm-backports.
bash "$(dirname "${BASH_SOURCE[0]}")/install-libvirt.sh"

if ! command -v cargo >/dev/null 2>&1; then
	echo "install-deps: cargo not found; install a current Rust toolchain (https://rustup.rs) and run this again" >&2
	exit 1
fi

if [ $BENCH = 1 ] && ! command -v virtiofsd >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/virtiofsd" ]; then
	echo "install-deps: building virtiofsd (cargo install virtiofsd --locked) for the benchmark"
	cargo install -j2 --locked virtiofsd
fi

# pjdfstest (the Rust port), which the guest conformance test runs inside the guest from the
# tools share (tests/tests/guest_pjdfstest.rs). A pinned version: its test list is the bar.
if [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest" ]; then
	echo "install-deps: building pjdfstest 0.2.2 (cargo install pjdfstest --locked) for the conformance test"
	cargo install -j2 --locked --version 0.2.2 pjdfstest
fi
