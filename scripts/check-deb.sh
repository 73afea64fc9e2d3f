#!/usr/bin/env bash
# Installs the package `make deb` built and checks that everything is where it belongs: the
# binary and its libexec names, the man pages, the completions, the vhost-user descriptors
# (valid JSON, and their binaries answer --print-capabilities with their type), and the
# systemd units (systemd-analyze verify). Run as root; .ci/run runs it after `make deb`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEB=$(ls -t target/debian/ferry_*.deb | head -n1)
fail() { echo "check-deb: $*" >&2; exit 1; }
for cmd in man systemd-analyze python3; do
	command -v $cmd >/dev/null || fail "$cmd is missing (install-deps.sh installs it)"
done
dpkg -i "$DEB" >/dev/null
dpkg -s ferry | grep -q '^Status: install ok installed' || fail "ferry is not installed after dpkg -i"
/usr/bin/ferry --version >/dev/null || fail "/usr/bin/ferry does not run"
for page in ferry ferry-serve ferry-ctl ferry-run ferry-mount ferry-portd ferry-virtiofsd; do
	man -w "$page" >/dev/null 2>&1 || fail "man $page: no page"
done
man ferry-serve 2>/dev/null | grep -q -- '--net-socket' || fail "man ferry-serve does not document --net-socket"
for f in /usr/share/bash-completion/completions/ferry /usr/share/zsh/vendor-completions/_ferry \
	/usr/share/fish/vendor_completions.d/ferry.fish; do
	[ -s "$f" ] || fail "$f is missing"
done
bash -c 'source /usr/share/bash-completion/completions/ferry && complete -p ferry' >/dev/null ||
	fail "the bash completion does not load"
for d in /usr/share/qemu/vhost-user/50-ferry-fs.json /usr/share/qemu/vhost-user/50-ferry-net.json; do
	python3 -m json.tool "$d" >/dev/null || fail "$d is not JSON"
	bin=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["binary"])' "$d")
	type=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["type"])' "$d")
	got=$("$bin" --print-capabilities | python3 -c 'import json,sys; print(json.load(sys.stdin)["type"])') ||
		fail "$bin --print-capabilities is not the spec's JSON"
	[ "$got" = "$type" ] || fail "$bin says type $got, its descriptor $type"
done
/usr/libexec/ferry-virtiofsd --print-capabilities | grep -q separate-options ||
	fail "ferry-virtiofsd does not list separate-options"
for u in ferry@.service ferry@.socket ferry-portd.service; do
	[ -f "/lib/systemd/system/$u" ] || fail "unit $u is missing"
done
# Templates are verified through an instance.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for u in ferry@.service ferry@.socket; do
	cp "/lib/systemd/system/$u" "$tmp/${u/@/@vm1}"
done
cp /lib/systemd/system/ferry-portd.service "$tmp/"
out=$(cd "$tmp" && systemd-analyze verify --man=no ./ferry@vm1.socket ./ferry@vm1.service ./ferry-portd.service 2>&1) ||
	fail "systemd-analyze verify: $out"
echo "check-deb: $DEB installs, and every file is where it belongs"
