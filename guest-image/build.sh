#!/bin/bash
# Build the Ferry test guest: out/vmlinuz + out/initramfs.cpio.gz, from the
# Debian packages pinned in packages.lock (fetched with apt-get download into
# cache/, unpacked with dpkg -x; nothing is installed on the host).
# Usage: bash guest-image/build.sh [--force] [--kernel-lock FILE]     (any cwd)
#   --kernel-lock kernel-6.12.lock   the same guest with the kernel pinned in FILE instead
#                                    (Debian's bookworm-backports one), in out-6.12/: the
#                                    guest suites run on a second kernel (see the Makefile)
set -euo pipefail

HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
LOCK=$HERE/packages.lock
CACHE=$HERE/cache
DEBS=$CACHE/debs
FORCE= KLOCK=
while [ $# -gt 0 ]; do
	case "$1" in
	--force) FORCE=1 ;;
	--kernel-lock) KLOCK=$(readlink -f "$2") || { echo "guest-image: --kernel-lock needs a file" >&2; exit 2; }; shift ;;
	*) echo "usage: $0 [--force] [--kernel-lock FILE]" >&2; exit 2 ;;
	esac
	shift
done
if [ -n "$KLOCK" ]; then
	[ -f "$KLOCK" ] || { echo "guest-image: error: kernel lock $KLOCK not found" >&2; exit 1; }
	NAME=$(basename "$KLOCK" .lock); NAME=${NAME#kernel-}
	WORK=$CACHE/build-$NAME
	OUT=$HERE/out-$NAME
else
	WORK=$CACHE/build
	OUT=$HERE/out
fi
STAMP=$OUT/.stamp

# Loaded in this order; dependencies found in .modinfo are pulled in first,
# modules built into the kernel (modules.builtin) are skipped.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
failover net_failover virtio_net fuse virtiofs qemu_fw_cfg"
BINARIES="usr/bin/iperf3 usr/bin/fio usr/sbin/dhcpcd"

say() { echo "guest-image: $*"; }
die() { echo "guest-image: error: $*" >&2; exit 1; }

for t in apt-get dpkg-deb sha256sum readelf cpio gzip; do
	command -v "$t" >/dev/null || die "required host tool '$t' not found"
done

# ---- no-op check -------------------------------------------------------------
inputs_hash() {
	(cd "$HERE" && { echo "$MODULES"; find build.sh init packages.lock files ${KLOCK:+"$KLOCK"} -type f | LC_ALL=C sort | xargs sha256sum; }) | sha256sum | cut -d' ' -f1
}
HASH=$(inputs_hash)
if [ -z "$FORCE" ] && [ -f "$STAMP" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ] &&
	[ "$(cat "$STAMP")" = "$HASH $(sha256sum < "$OUT/vmlinuz" | cut -d' ' -f1) $(sha256sum < "$OUT/initramfs.cpio.gz" | cut -d' ' -f1)" ]; then
	say "up to date ($OUT)"
	exit 0
fi

# ---- fetch pinned .debs ------------------------------------------------------
mkdir -p "$DEBS"
APT_UPDATED=
fetch() { # name version sha256 -> path of verified .deb
	local name=$1 ver=$2 sha=$3
	local deb="$DEBS/${name}_${ver//:/%3a}.deb"
	if [ -f "$deb" ] && [ "$(sha256sum < "$deb" | cut -d' ' -f1)" = "$sha" ]; then
		echo "$deb"; return
	fi
	local tmp; tmp=$(mktemp -d "$DEBS/.dl.XXXXXX")
	chmod 755 "$tmp"   # lets apt's _apt sandbox user write here
	if ! (cd "$tmp" && apt-get download -q "$name=$ver") >"$tmp/log" 2>&1; then
		if [ -z "$APT_UPDATED" ]; then
			say "apt-get download $name=$ver failed; running apt-get update and retrying" >&2
			APT_UPDATED=1
			apt-get update -q >&2 || say "apt-get update failed" >&2
		fi
		if ! (cd "$tmp" && apt-get download -q "$name=$ver") >"$tmp/log" 2>&1; then
			sed 's/^/    /' "$tmp/log" >&2; rm -rf "$tmp"
			die "pinned package $name version $ver is no longer downloadable from the apt archive; run 'apt-cache policy $name' to see the current version, then 'bash guest-image/update-pins.sh' (for a new kernel ABI: 'bash guest-image/update-pins.sh --latest-kernel'; for kernel-6.12.lock's: '--backports-kernel') and rebuild."
		fi
	fi
	local got; got=$(find "$tmp" -name '*.deb' | head -n1)
	[ -n "$got" ] || { rm -rf "$tmp"; die "apt-get download $name=$ver produced no .deb"; }
	local gotsha; gotsha=$(sha256sum < "$got" | cut -d' ' -f1)
	if [ "$gotsha" != "$sha" ]; then
		rm -rf "$tmp"
		die "sha256 mismatch for $name $ver (got $gotsha, packages.lock says $sha); if the archive legitimately changed run 'bash guest-image/update-pins.sh'."
	fi
	mv "$got" "$deb"; rm -rf "$tmp"
	echo "$deb"
}

KPKG=
declare -a DEBLIST=()
# With --kernel-lock, its kernel replaces packages.lock's; it comes from bookworm-backports,
# whose apt source is added (derived from the machine's Debian entry) when missing.
if [ -n "$KLOCK" ]; then
	. "$HERE/../scripts/backports-source.sh"
fi
pins() { # the pins: packages.lock's, its kernel replaced by --kernel-lock's
	if [ -z "$KLOCK" ]; then cat "$LOCK"; return; fi
	grep -v '^linux-image-' "$LOCK"
	grep '^linux-image-' "$KLOCK"
}
while read -r name ver sha rest; do
	case "$name" in ''|'#'*) continue ;; esac
	[ -n "$sha" ] && [ -z "$rest" ] || die "bad pin: $name $ver $sha $rest"
	deb=$(fetch "$name" "$ver" "$sha")
	case "$name" in linux-image-*) KPKG=$deb; KVER=${name#linux-image-} ;; *) DEBLIST+=("$deb") ;; esac
done < <(pins)
[ -n "$KPKG" ] || die "no linux-image-* package in packages.lock"
say "fetched $(( ${#DEBLIST[@]} + 1 )) pinned packages"

# ---- unpack ------------------------------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK/kernel" "$WORK/sysroot" "$WORK/root"
dpkg-deb -x "$KPKG" "$WORK/kernel"
for d in "${DEBLIST[@]}"; do dpkg-deb -x "$d" "$WORK/sysroot"; done
K=$WORK/kernel; S=$WORK/sysroot; R=$WORK/root
MODDIR=$K/lib/modules/$KVER
[ -f "$K/boot/vmlinuz-$KVER" ] || die "vmlinuz-$KVER not found in kernel package"
[ -d "$MODDIR" ] || die "modules for $KVER not found in kernel package"

# ---- skeleton ----------------------------------------------------------------
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib/modules,etc,proc,sys,dev,tmp,run,mnt,root,var,usr/share/udhcpc}
chmod 1777 "$R/tmp"; chmod 700 "$R/root"
ln -s ../run "$R/var/run"
if [ "$(id -u)" = 0 ]; then
	mknod -m 600 "$R/dev/console" c 5 1
	mknod -m 666 "$R/dev/null" c 1 3
fi
install -m 755 "$HERE/init" "$R/init"
install -m 755 "$HERE/files/default.script" "$R/usr/share/udhcpc/default.script"
install -m 644 "$HERE/files/passwd" "$HERE/files/group" "$HERE/files/hosts" "$R/etc/"
echo ferry-guest > "$R/etc/hostname"
# dhcpcd (IPv6): its hook runner and Ferry's config and exit hook; /usr/lib/dhcpcd is the
# home its privilege-separation user chroots into.
mkdir -p "$R/usr/lib/dhcpcd/dhcpcd-hooks" "$R/var/lib/dhcpcd"
install -m 644 "$HERE/files/dhcpcd.conf" "$HERE/files/dhcpcd.exit-hook" "$R/etc/"
: > "$R/etc/resolv.conf"

install -m 755 "$S/usr/lib/dhcpcd/dhcpcd-run-hooks" "$R/usr/lib/dhcpcd/dhcpcd-run-hooks"

# ---- busybox -----------------------------------------------------------------
[ -x "$S/bin/busybox" ] || die "busybox not found in busybox-static package"
install -m 755 "$S/bin/busybox" "$R/bin/busybox"
"$R/bin/busybox" --list-full | while read -r applet; do
	[ -e "$R/$applet" ] || [ -L "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done
[ -L "$R/bin/sh" ] || die "busybox has no sh applet?"

# ---- kernel + modules --------------------------------------------------------
mkdir -p "$OUT"
install -m 644 "$K/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
modpath() { # module name -> path relative to MODDIR (or empty)
	local f; f=$(find "$MODDIR/kernel" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" -o -name "$1.ko.gz" | head -n1)
	if [ -z "$f" ]; then f=$(find "$MODDIR/kernel" -name "${1//_/-}.ko*" | head -n1); fi
	echo "${f#"$MODDIR"/}"
}
is_builtin() { grep -Eq "/($1|${1//_/-})\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; }
decompress_to() { # src dst
	case "$1" in
	*.ko) cp "$1" "$2" ;;
	*.ko.xz) xz -dc "$1" > "$2" ;;
	*.ko.zst) zstd -qdc "$1" > "$2" ;;
	*.ko.gz) gzip -dc "$1" > "$2" ;;
	esac
}
LOADED=" "
: > "$R/etc/ferry-modules"
add_module() {
	local m=${1//-/_} p dep
	case "$LOADED" in *" $m "*) return ;; esac
	if is_builtin "$m"; then LOADED="$LOADED$m "; say "module $m is built-in"; return; fi
	p=$(modpath "$m")
	[ -n "$p" ] || die "kernel module $m is neither built-in nor present in $KVER"
	decompress_to "$MODDIR/$p" "$R/lib/modules/$m.ko"
	for dep in $(readelf -p .modinfo "$R/lib/modules/$m.ko" | sed -n 's/.*\] *depends=//p' | tr ',' ' '); do
		add_module "$dep"
	done
	LOADED="$LOADED$m "
	echo "$m" >> "$R/etc/ferry-modules"
}
for m in $MODULES; do add_module "$m"; done
say "modules: $(tr '\n' ' ' < "$R/etc/ferry-modules")"

# ---- iperf3 / fio + shared library closure -----------------------------------
LIBDIRS="lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64 lib usr/lib"
elf_dyn() { readelf -d "$1" 2>/dev/null | sed -n "s/.*($2).*\[\(.*\)\]/\1/p"; }
find_lib() { # soname requesting-file(relative) -> relative path in sysroot
	local so=$1 from=$2 d rp
	for rp in $(elf_dyn "$S/$from" RUNPATH | tr ':' ' ') $(elf_dyn "$S/$from" RPATH | tr ':' ' '); do
		rp=${rp//\$ORIGIN/\/$(dirname "$from")}; rp=${rp//\$\{ORIGIN\}/\/$(dirname "$from")}
		rp=${rp#/}
		[ -e "$S/$rp/$so" ] && { echo "$rp/$so"; return; }
	done
	for d in $LIBDIRS; do
		[ -e "$S/$d/$so" ] && { echo "$d/$so"; return; }
	done
	return 1
}
copy_file() { # relative path: copy dereferenced, keep the path
	mkdir -p "$R/$(dirname "$1")"
	cp -L "$S/$1" "$R/$1"
}
declare -A SEEN=()
queue=()
for b in $BINARIES; do
	[ -f "$S/$b" ] || die "$b not found in the unpacked packages"
	copy_file "$b"; queue+=("$b")
done
interp=$(readelf -l "$S/${BINARIES%% *}" | sed -n 's/.*Requesting program interpreter: \/\(.*\)\]/\1/p')
[ -e "$S/$interp" ] || die "dynamic loader /$interp not found in unpacked libc6"
copy_file "$interp"
missing=
while [ ${#queue[@]} -gt 0 ]; do
	f=${queue[0]}; queue=("${queue[@]:1}")
	for so in $(elf_dyn "$S/$f" NEEDED); do
		[ -z "${SEEN[$so]:-}" ] || continue
		SEEN[$so]=1
		if lib=$(find_lib "$so" "$f"); then
			copy_file "$lib"; queue+=("$lib")
		else
			missing="$missing $so(needed by /$f)"
		fi
	done
done
[ -z "$missing" ] || die "shared libraries not found in the pinned packages:$missing -- add the package providing them to PACKAGES in update-pins.sh ('dpkg -S SONAME' or packages.debian.org) and run it."
say "copied ${#SEEN[@]} shared libraries for: $BINARIES"
if [ "$(id -u)" = 0 ] && [ "$(uname -m)" = x86_64 ]; then
	for b in $BINARIES; do
		chroot "$R" "/$b" --version >/dev/null 2>&1 || die "/$b --version fails inside the image tree (chroot test)"
	done
	say "chroot test: $(chroot "$R" /usr/bin/iperf3 --version | head -n1); $(chroot "$R" /usr/bin/fio --version)"
fi

# ---- pack ----------------------------------------------------------------------
EPOCH=${SOURCE_DATE_EPOCH:-0}
find "$R" -exec touch -h -d "@$EPOCH" {} +
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) |
	gzip -9 -n > "$OUT/initramfs.cpio.gz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
echo "$HASH $(sha256sum < "$OUT/vmlinuz" | cut -d' ' -f1) $(sha256sum < "$OUT/initramfs.cpio.gz" | cut -d' ' -f1)" > "$STAMP"
say "built $OUT/vmlinuz ($(du -h "$OUT/vmlinuz" | cut -f1)) and $OUT/initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1), $(du -sh "$R" | cut -f1) unpacked), kernel $KVER"
