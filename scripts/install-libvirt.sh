#!/usr/bin/env bash
# Installs libvirt 11.3 from Debian's bookworm-backports (the daemon, its QEMU driver and virsh)
# for the libvirt end-to-end test (tests/tests/libvirt.rs), which starts a private session
# daemon of its own. Bookworm's own libvirt 9.0 cannot probe QEMU 10; 11.3 drives both QEMUs.
# Nothing is started or enabled here. Idempotent and quick when installed.
set -euo pipefail
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
