#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds (default 600) and prints one line per target:
# executions, corpus size, and whether it found anything. Used by `make fuzz` (and by CI with
# 30 s as a smoke run). Installs cargo-fuzz when it is missing; needs the nightly toolchain and
# root (guest_frames and queue_chains enter a network namespace of their own).
#   fuzz/run.sh [SECS] [TARGET...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuse_requests guest_frames dns_answers proxy_requests specs api_requests queue_chains)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
build_log=$(mktemp)
if ! cargo +nightly fuzz build >"$build_log" 2>&1; then
	cat "$build_log"
	echo "fuzz: the targets do not build (above)"
	exit 1
fi
rm -f "$build_log"
status=0
for t in "${targets[@]}"; do
	mkdir -p "corpus/$t"
	seeds=()
	[ -d "seeds/$t" ] && seeds=("seeds/$t")
	log=$(mktemp)
	# -rss_limit_mb: the file server's replies and the stack's buffers are large but bounded.
	if cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
		-max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1; then
		found=none
	else
		found="FOUND (see fuzz/artifacts/$t)"
		status=1
		grep -E "panicked|ERROR|SUMMARY" "$log" | head -n 5
	fi
	runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
	corpus=$(ls "corpus/$t" | wc -l)
	echo "fuzz: $t: $runs executions in ${secs} s, corpus $corpus inputs, findings: $found"
	rm -f "$log"
done
exit $status
