#!/usr/bin/env bash
# Offline import throughput: a release server on a fresh database with the example configuration
# (4 Wasm enrichers, 7 audiences), PEOPLE profiles that logged in with an email hash, then a CSV of
# ROWS store purchases for them imported with `starling import`.
#
#   scripts/bench-import.sh [PEOPLE] [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
people=${1:-10000}
rows=${2:-100000}
cargo build --release -p starling-cli
./target/release/starling plugin build connectors >/dev/null
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
./target/release/starling serve --config examples/starling.toml --database "$work/bench.db" \
    --listen 127.0.0.1:8088 >"$work/out" 2>"$work/log" &
server=$!
for _ in $(seq 1 240); do grep -q listening "$work/out" && break; sleep 0.5; done

python3 - "$people" "$rows" "$work" <<'PY'
import json, sys, urllib.request, random
people, rows, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for start in range(0, people, 1000):
    events = [{"event": "login", "visitor_id": f"anon-{i}", "data": {"email_hash": f"hash-{i:08d}"}}
              for i in range(start, min(start + 1000, people))]
    req = urllib.request.Request("http://127.0.0.1:8088/v1/events", json.dumps({"events": events}).encode(),
                                 {"content-type": "application/json"})
    urllib.request.urlopen(req).read()
random.seed(7)
with open(f"{work}/store.csv", "w") as f:
    f.write("email_hash,amount,store,bought_at\n")
    for r in range(rows):
        f.write(f"hash-{random.randrange(people):08d},{random.randrange(100, 20000) / 100},store-{r % 40},2026-11-{1 + r % 28:02d}T12:00:00Z\n")
PY
start=$(date +%s.%N)
./target/release/starling import "$work/store.csv" --definition store_purchases --server http://127.0.0.1:8088
end=$(date +%s.%N)
python3 -c "import sys; s=float(sys.argv[2])-float(sys.argv[1]); print(f'{int(sys.argv[3])} rows in {s:.2f} s: {int(sys.argv[3])/s:,.0f} rows/s')" "$start" "$end" "$rows"
# Where the time went, from the server's own metrics.
curl -s http://127.0.0.1:8088/metrics | python3 -c '
import sys
m = {}
for line in sys.stdin:
    if line.startswith("#") or " " not in line: continue
    k, v = line.rsplit(" ", 1); m[k] = float(v)
n = m["starling_event_apply_seconds_count"]
apply_us = 1e6 * m["starling_event_apply_seconds_sum"] / n
print(f"apply per event (identity, enrichments, 4 Wasm enrichers, audiences): {apply_us:.0f} µs over {n:.0f} events")
for name in ("value-tier", "user-agent", "engagement", "email-domain"):
    calls = m.get("starling_plugin_calls{name=\"%s\"}" % name, 0)
    if calls:
        spent = m["starling_plugin_call_seconds{name=\"%s\"}" % name]
        print(f"  {name}: {1e6 * spent / calls:.1f} µs per call")
c = m["starling_commit_seconds_count"]
commit_ms = 1e3 * m["starling_commit_seconds_sum"] / c
print(f"commit: {commit_ms:.1f} ms mean over {c:.0f} commits")
'
