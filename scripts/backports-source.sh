# Sourced by the install scripts that take packages from Debian's bookworm-backports: adds that
# suite as an apt source derived from the machine's own Debian entry (same URIs and key), never
# a hard-coded mirror, and refreshes the package lists. Sets $SUDO ("" as root, else sudo) for
# the script that sources it.
# Nothing is taken from backports unless asked for by name (pkg/bookworm-backports): the
# suite's default priority keeps every other package on bookworm's version.
SUDO=
if [ "$(id -u)" -ne 0 ]; then
	command -v sudo >/dev/null || { echo "$(basename "$0"): need root to install from bookworm-backports; run as root or install sudo" >&2; exit 1; }
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
		echo "backports-source: found no Debian bookworm entry in /etc/apt to derive bookworm-backports from; add one (suite bookworm-backports) and run this again" >&2
		exit 1
	fi
	{
		echo "Types: deb"
		echo "URIs: $uris"
		echo "Suites: bookworm-backports"
		echo "Components: main"
		[ -n "$keyring" ] && echo "Signed-By: $keyring"
	} | $SUDO tee "$SRC" >/dev/null
	echo "backports-source: added $SRC (URIs: $uris)" >&2
	$SUDO apt-get update -q >&2
fi

