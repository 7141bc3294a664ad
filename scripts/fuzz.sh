#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ with libFuzzer (cargo fuzz, nightly toolchain), each for
# SECONDS (default 60): scripts/fuzz.sh [SECONDS] [TARGET...]. Targets: config, events, import,
# egress, wit_values, wire.
# A crash stops the run and leaves its input in fuzz/artifacts/TARGET/; each one found becomes
# a regression test next to the code it broke.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(config events import egress wit_values wire)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    echo "== $target: $seconds s"
    log="fuzz/$target.log"
    status=0
    cargo +nightly fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1 || status=$?
    grep -E "^#[0-9]+" "$log" | tail -1
    if [ "$status" -ne 0 ]; then
        grep -E "panicked|SUMMARY|Test unit written" "$log" || true
        echo "$target: crashed; the whole output is in $log, the input in fuzz/artifacts/$target/"
        exit 1
    fi
done
