#!/usr/bin/env bash
# End-to-end benchmarks (BENCHMARKS.md): a release build of the server on the benchmark
# configuration, driven by `starling loadgen` over loopback HTTP.
#
#   scripts/bench.sh                 # throughput (parse-only ceiling and durable) and latency
#   PEOPLE=1000000 EVENTS=2000000 scripts/bench.sh memory
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
people=${PEOPLE:-20000}
events=${EVENTS:-200000}

cargo build --release -p starling-cli
starling=target/release/starling
# Only the two plugins the benchmark configuration uses, so that memory figures are the engine's.
$starling plugin build connectors/webhook connectors/value-tier --out target/bench-plugins

# A fresh database each run; the compiled-plugin cache next to it is kept.
mkdir -p target/bench
rm -f target/bench/starling.db target/bench/starling.db-wal target/bench/starling.db-shm
$starling serve --config examples/benchmark.toml --plugins target/bench-plugins > target/bench/server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
# The first start compiles the plugins; later starts use the compiled-code cache.
for _ in $(seq 1 600); do
    curl -sf localhost:8080/healthz > /dev/null && break
    sleep 0.5
done
curl -sf localhost:8080/healthz > /dev/null || { echo "the server did not start:"; cat target/bench/server.log; exit 1; }

rss() { awk '/VmRSS/ { print $2 / 1024 " MiB" }' "/proc/$server/status"; }

if [[ $what == all || $what == throughput ]]; then
    echo "== parse-only ceiling"
    $starling loadgen --people "$people" --events "$events" --batch 500 --connections 8 --parse-only --prefix ceiling
    echo "== durable ingest"
    $starling loadgen --people "$people" --events "$events" --batch 500 --connections 8 \
        --trace-every 1000 --receiver 127.0.0.1:9998 --verify --prefix durable
    echo "server resident memory: $(rss)"
fi
if [[ $what == all || $what == latency ]]; then
    echo "== event -> connector latency at 1,000 events/s"
    $starling loadgen --people 5000 --events 30000 --batch 10 --connections 4 --rate 1000 \
        --trace-every 1 --receiver 127.0.0.1:9998 --prefix latency
fi
if [[ $what == memory ]]; then
    echo "== $people profiles"
    $starling loadgen --people "$people" --events "$events" --batch 1000 --connections 8 \
        --two-devices 0 --prefix memory
    echo "server resident memory after loading: $(rss)"
    kill $server; wait $server || true
    db=target/bench/starling.db
    sqlite_bytes=$(( $(stat -c %s $db) + $(stat -c %s $db-wal 2>/dev/null || echo 0) ))
    echo "database: $sqlite_bytes bytes, $(( sqlite_bytes / people )) bytes per profile (with its event log)"
fi
