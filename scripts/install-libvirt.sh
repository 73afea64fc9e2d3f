#!/usr/bin/env bash
# Installs libvirt 11.3 from Debian's bookworm-backports (the daemon, its QEMU driver and virsh)
# for the libvirt end-to-end tests (tests/tests/libvirt.rs), which start private daemons of
# their own. Bookworm's own libvirt 9.0 cannot probe QEMU 10; 11.3 drives both QEMUs. libvirt
# 9.0 is unpacked beside it under /opt/ferry/libvirt-9 (FERRY_LIBVIRT9_PREFIX overrides), for
# the test of the option syntax it passes to a virtiofsd.
# Nothing is started or enabled here. Idempotent and quick when installed.
set -euo pipefail
V9=${FERRY_LIBVIRT9_PREFIX:-/opt/ferry/libvirt-9}
if [ ! -x "$V9/usr/sbin/libvirtd" ]; then
	work=$(mktemp -d)
	chmod 755 "$work"
	(cd "$work" && apt-get download -q -o APT::Sandbox::User=root \
		libvirt-daemon/bookworm libvirt-daemon-driver-qemu/bookworm libvirt0/bookworm >&2)
	mkdir -p "$V9"
	for d in "$work"/*.deb; do dpkg-deb -x "$d" "$V9"; done
	rm -rf "$work"
	echo "install-libvirt: unpacked libvirt 9.0 under $V9" >&2
fi
# 9.0 links libyajl (11.3 uses json-c): unpacked, it brings no dependencies of its own.
if ! dpkg -s libyajl2 >/dev/null 2>&1; then
	SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends libyajl2 >&2
fi
if command -v virsh >/dev/null 2>&1 && command -v libvirtd >/dev/null 2>&1 &&
	[ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] &&
	virsh --version 2>/dev/null | grep -q '^11\.'; then
	exit 0
fi
. "$(dirname "${BASH_SOURCE[0]}")/backports-source.sh"
PKGS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt0 libvirt-common libvirt-daemon-common libvirt-daemon-log"
echo "install-libvirt: installing libvirt from bookworm-backports" >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
	$(printf '%s/bookworm-backports ' $PKGS) >&2
virsh --version >&2
