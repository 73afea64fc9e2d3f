#!/usr/bin/env bash
# Builds the Debian package, target/debian/ferry_VERSION_ARCH.deb, with dpkg-deb (Debian's own
# packaging tool; no cargo-deb build needed): the release binary, the man pages and shell
# completions `ferry generate` makes from the CLI's definition, the vhost-user descriptors,
# the systemd units and the libexec names libvirt and QEMU look for.
#   build-deb.sh     (make deb runs it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CARGO=${CARGO:-cargo}
JOBS=${JOBS:-2}
$CARGO build -j"$JOBS" --release -p ferry
BIN=target/release/ferry
VERSION=$(awk -F'"' '/^\[workspace.package\]/ {p=1} p && /^version/ {print $2; exit}' Cargo.toml)
ARCH=$(dpkg --print-architecture)
OUT=target/debian
STAGE=$OUT/stage
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN"

install -D -m 0755 "$BIN" "$STAGE/usr/bin/ferry"
strip --strip-debug "$STAGE/usr/bin/ferry"
# The names libvirt's <binary> and the vhost-user descriptors use: ferry acts on its name.
mkdir -p "$STAGE/usr/libexec"
ln -s ../bin/ferry "$STAGE/usr/libexec/ferry-virtiofsd"
ln -s ../bin/ferry "$STAGE/usr/libexec/ferry-vhost-user-net"

"$BIN" generate man "$STAGE/usr/share/man/man1"
gzip -9n "$STAGE"/usr/share/man/man1/*.1
"$BIN" generate bash "$STAGE/usr/share/bash-completion/completions"
mv "$STAGE/usr/share/bash-completion/completions/ferry.bash" "$STAGE/usr/share/bash-completion/completions/ferry"
"$BIN" generate zsh "$STAGE/usr/share/zsh/vendor-completions"
"$BIN" generate fish "$STAGE/usr/share/fish/vendor_completions.d"

install -D -m 0644 packaging/vhost-user/50-ferry-fs.json "$STAGE/usr/share/qemu/vhost-user/50-ferry-fs.json"
install -D -m 0644 packaging/vhost-user/50-ferry-net.json "$STAGE/usr/share/qemu/vhost-user/50-ferry-net.json"
for u in packaging/systemd/*; do
	install -D -m 0644 "$u" "$STAGE/lib/systemd/system/$(basename "$u")"
done
install -D -m 0644 packaging/example.toml "$STAGE/usr/share/doc/ferry/examples/ferry.toml"
install -D -m 0644 README.md "$STAGE/usr/share/doc/ferry/README.md"
mkdir -p "$STAGE/etc/ferry"

# The shared libraries the binary needs, as package dependencies.
deps=$(objdump -p "$STAGE/usr/bin/ferry" | awk '/NEEDED/ {print $2}' | while read -r lib; do
	path=$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ {print $NF; exit}')
	[ -n "$path" ] || continue
	# Under usrmerge dpkg knows a library by one of its two paths.
	{ dpkg -S "$path" 2>/dev/null || dpkg -S "$(readlink -f "$path")" 2>/dev/null || true; } | cut -d: -f1
done | sort -u | tr '\n' ',' | sed 's/,$//; s/,/, /g')
SIZE=$(du -sk "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: ferry
Version: $VERSION
Architecture: $ARCH
Maintainer: Ferry developers <ferry@localhost>
Installed-Size: $SIZE
Depends: ${deps:-libc6}
Recommends: qemu-system-x86 | qemu-system
Suggests: libvirt-daemon-driver-qemu
Section: admin
Priority: optional
Description: host-side vhost-user virtio-net and virtio-fs for Linux VMs, in one process
 Ferry serves a VM's network (a userspace NAT with DHCP, DNS, published ports, an HTTP proxy
 and rules) and its shared folders (a FUSE server over host directories) over vhost-user, so
 that firewalls, VPNs and EDR tools see one host process for all of the VM's traffic and file
 I/O. QEMU, libvirt and cloud-hypervisor attach to its sockets.
CONTROL
cat > "$STAGE/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
SCRIPT
cp "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/postrm"
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/postrm"

DEB=$OUT/ferry_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
