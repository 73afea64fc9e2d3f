#!/usr/bin/env bash
# Puts Debian's QEMU 10 (from bookworm-backports) beside the system's QEMU 7.2, in a private
# prefix, so the guest suites can run on both (issue 20). Installing it with apt would replace
# 7.2, which is the same package; so the packages are downloaded and unpacked instead. QEMU finds
# its firmware and data relative to its own binary; its loadable modules it looks for at the
# system's path (7.2's, which it refuses and then aborts on), so the command to run is a
# wrapper, PREFIX/bin/qemu-system-x86_64, that points QEMU_MODULE_DIR at the prefix's.
#
# The apt source comes from backports-source.sh.
#   install-qemu10.sh            unpack into /opt/ferry/qemu-10 (FERRY_QEMU10_PREFIX overrides)
# Prints the binary's path last. Idempotent and quick when the prefix is complete.
set -euo pipefail
PREFIX=${FERRY_QEMU10_PREFIX:-/opt/ferry/qemu-10}
REAL=$PREFIX/usr/bin/qemu-system-x86_64
BIN=$PREFIX/bin/qemu-system-x86_64
if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "version 10\."; then
	echo "$BIN"
	exit 0
fi

. "$(dirname "${BASH_SOURCE[0]}")/backports-source.sh"

# The packages, all from backports but the option ROMs. The module packages are needed even
# though nothing here uses a display: libvirt's capability probe (qom-list-types) loads every
# module QEMU knows, and one missing here would be looked for in, and taken from, 7.2's folder.
PKGS="qemu-system-x86 qemu-system-common qemu-system-data qemu-system-modules-opengl qemu-system-modules-spice seabios"
# The libraries they link come from bookworm itself; install any that are missing.
deps=$(for p in $PKGS; do apt-cache depends --no-recommends --no-suggests "$p/bookworm-backports" 2>/dev/null; done |
	awk '/Depends: lib/ { print $2 }' | sort -u)
missing=()
for p in $deps; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
	echo "install-qemu10: installing ${missing[*]}" >&2
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root $(printf '%s/bookworm-backports ' $PKGS) ipxe-qemu >&2)
$SUDO mkdir -p "$PREFIX"
for d in "$work"/*.deb; do $SUDO dpkg-deb -x "$d" "$PREFIX"; done
$SUDO mkdir -p "$PREFIX/bin"
printf '#!/bin/sh\n# QEMU 10 from bookworm-backports, unpacked by ferry'"'"'s scripts/install-qemu10.sh.\nQEMU_MODULE_DIR=%s exec %s "$@"\n' \
	"$PREFIX/usr/lib/x86_64-linux-gnu/qemu" "$REAL" | $SUDO tee "$BIN" >/dev/null
$SUDO chmod 755 "$BIN"
"$BIN" --version >&2
echo "$BIN"
