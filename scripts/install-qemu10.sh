#!/usr/bin/env bash
# Puts Debian's QEMU 10 (from bookworm-backports) beside the system's QEMU 7.2, in a private
# prefix, so the guest suites can run on both (issue 20). Installing it with apt would replace
# 7.2, which is the same package; so the packages are downloaded and unpacked instead. QEMU finds
# its firmware and data relative to its own binary, so the prefix needs no flags.
#
# The apt source is derived from the machine's own Debian entry (same URIs and key, suite
# bookworm-backports), never a hard-coded mirror.
#   install-qemu10.sh            unpack into /opt/ferry/qemu-10 (FERRY_QEMU10_PREFIX overrides)
# Prints the binary's path last. Idempotent and quick when the prefix is complete.
set -euo pipefail
PREFIX=${FERRY_QEMU10_PREFIX:-/opt/ferry/qemu-10}
BIN=$PREFIX/usr/bin/qemu-system-x86_64
if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "version 10\."; then
	echo "$BIN"
	exit 0
fi
SUDO=
if [ "$(id -u)" -ne 0 ]; then
	command -v sudo >/dev/null || { echo "install-qemu10: need root to add the backports source and unpack into $PREFIX; run as root or install sudo" >&2; exit 1; }
	SUDO=sudo
fi

SRC=/etc/apt/sources.list.d/ferry-backports.sources
if ! apt-cache policy 2>/dev/null | grep -q "bookworm-backports/main"; then
	# The Debian archive's entry: the deb822 stanza or one-line entry whose suite is `bookworm`.
	uris= keyring=
	for f in /etc/apt/sources.list.d/*.sources; do
		[ -e "$f" ] || continue
		uris=$(awk 'BEGIN{RS=""} /(^|\n)Suites:[^\n]*(^| )bookworm( |\n|$)/ { if (match($0, /URIs:[^\n]*/)) { print substr($0, RSTART+5, RLENGTH-5); exit } }' "$f" | xargs)
		keyring=$(awk 'BEGIN{RS=""} /(^|\n)Suites:[^\n]*(^| )bookworm( |\n|$)/ { if (match($0, /Signed-By:[^\n]*/)) { print substr($0, RSTART+10, RLENGTH-10); exit } }' "$f" | xargs)
		[ -n "$uris" ] && break
	done
	if [ -z "$uris" ] && [ -e /etc/apt/sources.list ]; then
		uris=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
	fi
	if [ -z "$uris" ]; then
		echo "install-qemu10: found no Debian bookworm entry in /etc/apt to derive bookworm-backports from; add one (suite bookworm-backports) and run this again" >&2
		exit 1
	fi
	{
		echo "Types: deb"
		echo "URIs: $uris"
		echo "Suites: bookworm-backports"
		echo "Components: main"
		[ -n "$keyring" ] && echo "Signed-By: $keyring"
	} | $SUDO tee "$SRC" >/dev/null
	echo "install-qemu10: added $SRC (URIs: $uris)" >&2
	$SUDO apt-get update -q >&2
fi

# The libraries QEMU 10 links come from bookworm itself; install any that are missing.
deps=$(apt-cache depends --no-recommends --no-suggests qemu-system-x86/bookworm-backports 2>/dev/null |
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
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
	qemu-system-data/bookworm-backports seabios/bookworm-backports ipxe-qemu >&2)
$SUDO mkdir -p "$PREFIX"
for d in "$work"/*.deb; do $SUDO dpkg-deb -x "$d" "$PREFIX"; done
"$BIN" --version >&2
echo "$BIN"
