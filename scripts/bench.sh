#!/usr/bin/env bash
# End-to-end benchmarks (BENCHMARKS.md): a release build of the server on the benchmark
# configuration, driven by `starling loadgen` over loopback HTTP.
#
#   scripts/bench.sh throughput      # parse-only and in-memory-log ceilings, then durable ingest
#   scripts/bench.sh lean            # the same with wrk (scripts/wrk-events.lua) as a lean client
#   scripts/bench.sh latency         # event -> connector at 1,000 events/s for 5 minutes
#   PEOPLE=10000000 scripts/bench.sh memory   # resident memory per million people loaded
#   PEOPLE=500000 scripts/bench.sh stitched   # resident memory with every profile stitched
#   scripts/bench.sh disk            # 10 minutes at 20,000 events/s: sizes on disk each minute
#   PEOPLE=1000000 scripts/bench.sh recovery   # kill -9 under load, time until serving again
#   PEOPLE=200000 EVENTS=1000000 scripts/bench.sh reconfigure   # backfills and a backtest after live changes
#   scripts/bench.sh cluster         # embedded log vs JetStream vs through a standby; failover
#                                    # (SNAPSHOT_EVERY=60s: the nodes' snapshot interval, default 10s)
#   STARLING=path/to/starling scripts/bench.sh cluster   # the same with another build, for a comparison
#   scripts/bench.sh spread          # one node owning every partition vs two nodes sharing
#                                    # them, the load split over both (fresh NATS servers each;
#                                    # CONNECTIONS=16: connections through each node, default 4)
#   RUST_LOG=info,starling_server::node=debug scripts/bench.sh catchup   # a standby following a
#                                    # stream of EVENTS events from its start, the machine idle
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-throughput}
people=${PEOPLE:-20000}
events=${EVENTS:-200000}

if [[ -z ${STARLING:-} ]]; then
    cargo build --release -p starling-cli
fi
starling=${STARLING:-${CARGO_TARGET_DIR:-target}/release/starling}
# Only the two plugins the benchmark configuration uses, so that memory figures are the engine's.
$starling plugin build connectors/webhook connectors/value-tier --out target/bench-plugins

mkdir -p target/bench
db=target/bench/starling.db
server=

# The benchmark configuration with `$1` added to its [server] section and `$2` appended.
variant() {
    local out=target/bench/variant.toml
    sed "s|^\[server\]|[server]\n$1|" examples/benchmark.toml > "$out"
    printf '%s\n' "${2:-}" >> "$out"
    echo "$out"
}

# A fresh database and event log, unless `keep` is given.
start() {
    local config=$1 keep=${2:-}
    if [[ -z $keep ]]; then
        rm -rf $db $db-wal $db-shm $db.log
    fi
    $starling serve --config "$config" --database $db --plugins target/bench-plugins >> target/bench/server.log 2>&1 &
    server=$!
    # The first start compiles the plugins; later starts use the compiled-code cache.
    for _ in $(seq 1 600); do
        curl -sf localhost:8080/healthz > /dev/null && return
        sleep 0.5
    done
    echo "the server did not start:"
    tail -50 target/bench/server.log
    exit 1
}

stop() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
}
trap 'kill $server 2>/dev/null || true' EXIT

rss() { awk '/VmRSS/ { print $2 / 1024 " MiB" }' "/proc/$server/status"; }
sizes() {
    local sqlite=$(( $(stat -c %s $db) + $(stat -c %s $db-wal 2>/dev/null || echo 0) ))
    local log=$(du -sb $db.log 2>/dev/null | cut -f1)
    echo "sqlite $sqlite bytes, event log ${log:-0} bytes"
}
load() {
    $starling loadgen --people "$people" --events "$events" --batch 500 --connections 8 "$@"
}

: > target/bench/server.log
# Three nats-server processes on loopback as one cluster (R3, every write synced), as in
# docs/cluster.md; nodes started with `node` are killed with them on exit.
start_cluster() {
    nats=$(scripts/nats.sh)
    dir=$PWD/target/bench/nats
    rm -rf "$dir" target/bench/node-*
    mkdir -p "$dir"
    nats_pids=()
    for i in 0 1 2; do
        cat > "$dir/n$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:1422$i
http: 127.0.0.1:822$i
jetstream { store_dir: "$dir/n$i", sync_interval: always }
cluster {
  name: starling-bench
  listen: 127.0.0.1:1622$i
  routes: [nats-route://127.0.0.1:16220, nats-route://127.0.0.1:16221, nats-route://127.0.0.1:16222]
}
EOF
        "$nats" -c "$dir/n$i.conf" > "$dir/n$i.log" 2>&1 &
        nats_pids+=($!)
    done
    nodes=()
    trap 'kill $server ${nodes[*]:-} ${nats_pids[*]} 2>/dev/null || true' EXIT
}

# Node `$1` of the cluster, listening on port `$2` (lease 3 s, a snapshot every SNAPSHOT_EVERY).
node() {
    mkdir -p "target/bench/node-$1"
    variant '' "$(printf '[cluster]\nnats = ["nats://127.0.0.1:14220", "nats://127.0.0.1:14221", "nats://127.0.0.1:14222"]\nnode = "%s"\nlease = "3s"\nsnapshot_every = "%s"\nplacement = "%s"' "$1" "${SNAPSHOT_EVERY:-10s}" "${PLACEMENT:-whole}")" > /dev/null
    cp target/bench/variant.toml "target/bench/node-$1/starling.toml"
    $starling serve --config "target/bench/node-$1/starling.toml" --database "target/bench/node-$1/starling.db" \
        --plugins target/bench-plugins --listen "127.0.0.1:$2" >> "target/bench/node-$1.log" 2>&1 &
    nodes+=($!)
}

# CPU seconds (user and system) the processes `$@` have used so far, added up.
cpu_seconds() {
    local ticks=0
    for pid in "$@"; do
        ticks=$(( ticks + $(awk '{ print $14 + $15 }' "/proc/$pid/stat") ))
    done
    awk "BEGIN { printf \"%.2f\", $ticks / $(getconf CLK_TCK) }"
}

# Messages the three NATS servers have taken in so far (from clients and from each other).
nats_messages() {
    local total=0
    for i in 0 1 2; do
        total=$(( total + $(curl -sf "localhost:822$i/varz" | python3 -c 'import json, sys; print(json.load(sys.stdin)["in_msgs"])') ))
    done
    echo $total
}

# What the Starling nodes and the NATS servers used of the CPU, and the messages the servers
# took in, since `$1`, `$2` and `$3` (from `cpu_seconds` and `nats_messages`), per thousand of
# `$4` events.
cost_per_event() {
    local starling_now nats_now messages_now commits_now
    starling_now=$(cpu_seconds "${nodes[@]}")
    nats_now=$(cpu_seconds "${nats_pids[@]}")
    messages_now=$(nats_messages)
    commits_now=$(sqlite_commits)
    awk "BEGIN { printf \"per 1,000 events: CPU of the Starling nodes %.3f s, of the NATS servers %.3f s; %.0f messages into the NATS servers; %.1f SQLite commits\\n\", ($starling_now - $1) * 1000 / $4, ($nats_now - $2) * 1000 / $4, ($messages_now - $3) * 1000 / $4, ($commits_now - $5) * 1000 / $4 }"
}

# SQLite transactions of applied state the nodes on ports 8080 and 8081 made so far, added up:
# the state's commits and the claims and actions written ahead of it.
sqlite_commits() {
    local total=0 port count
    for port in 8080 8081; do
        # A port with no node (8081 while one node runs) counts nothing.
        count=$(curl -sf "localhost:$port/metrics" \
            | awk '/^starling_(commit|early_write)_seconds_count/ { n += $2 } END { print n + 0 }') || true
        total=$(( total + ${count:-0} ))
    done
    echo $total
}

# Waits until the node on port `$1` serves.
serving() {
    for _ in $(seq 1 1200); do
        curl -sf "localhost:$1/v1/cluster" | grep -q '"serving":true' && return
        sleep 0.05
    done
    echo "the node on port $1 did not serve"
    exit 1
}

case $what in
reconfigure)
    start examples/benchmark.toml
    load --prefix reconf
    url=http://127.0.0.1:8080
    # An added audience few profiles join: the backfill is the scan (read, parse, check).
    cp examples/benchmark.toml target/bench/few.toml
    printf '\n[[audience]]\nname = "devoted"\nrule = { attribute = "event_count", op = ">=", value = 100000 }\n' >> target/bench/few.toml
    echo "== backfill of an audience no profile joins"
    $starling config apply target/bench/few.toml --server $url
    grep 'backfill done' target/bench/server.log | tail -1
    # An added audience every profile joins: each profile is also rewritten by its worker.
    cp target/bench/few.toml target/bench/many.toml
    printf '\n[[audience]]\nname = "anyone"\nrule = { attribute = "event_count", op = ">=", value = 1 }\n' >> target/bench/many.toml
    echo "== backfill of an audience every profile joins"
    $starling config apply target/bench/many.toml --server $url
    grep 'backfill done' target/bench/server.log | tail -1
    echo "== preview of a rule"
    $starling audience preview --rule '{ attribute = "lifetime_spend", op = ">", value = 100 }' --server $url | head -1
    echo "== backtest of the recorded events (the Wasm enricher runs as it would live)"
    $starling backtest target/bench/few.toml --since 1h --server $url | head -1
    ;;
throughput)
    start "$(variant 'event_log = "memory"')"
    echo "== parse-only ceiling"
    load --parse-only --prefix ceiling
    echo "== in-memory log ceiling (the same pipeline, the log not on disk)"
    load --trace-every 1000 --receiver 127.0.0.1:9998 --verify --prefix memory
    stop
    start examples/benchmark.toml
    echo "== durable ingest"
    load --trace-every 1000 --receiver 127.0.0.1:9998 --verify --prefix durable
    echo "server resident memory: $(rss); $(sizes)"
    curl -s localhost:8080/metrics | grep -E '^starling_(commit|log_sync|event_apply)_seconds_(sum|count)'
    ;;
lean)
    # wrk (Debian's package) posting prepared 500-event bodies: events/s = requests/s x 500.
    lean() {
        wrk -t2 -c8 -d30s -s scripts/wrk-events.lua "http://127.0.0.1:8080/v1/events$1" |
            awk '/Requests\/sec/ { printf "%.0f events/s (%s requests/s)\n", $2 * 500, $2 } /Latency|Non-2xx/'
    }
    start "$(variant 'event_log = "memory"')"
    echo "== parse-only ceiling"; lean "?dry_run=true"
    echo "== in-memory log ceiling"; lean ""
    stop
    start examples/benchmark.toml
    echo "== durable ingest"; lean ""
    echo "server resident memory: $(rss); $(sizes)"
    ;;
latency)
    start examples/benchmark.toml
    echo "== event -> connector latency at 1,000 events/s for 5 minutes"
    $starling loadgen --people 5000 --events 300000 --batch 10 --connections 4 --rate 1000 \
        --trace-every 1 --receiver 127.0.0.1:9998 --prefix latency
    curl -s localhost:8080/metrics | grep -E '^starling_(commit|log_sync|event_apply)_seconds_(sum|count)'
    ;;
memory)
    # Loaded a million people at a time (a million events each time, each to a person picked at
    # random, so about 632,000 new profiles), with resident memory after each, to show whether
    # it grows with the number of profiles.
    start examples/benchmark.toml
    step=$(( people < 1000000 ? people : 1000000 ))
    for (( loaded = 0; loaded < people; loaded += step )); do
        $starling loadgen --people "$step" --events "$step" --batch 1000 --connections 8 \
            --two-devices 0 --prefix "memory-$loaded" | grep applied
        # The generator picks people at random: count the profiles it made.
        profiles=$(sqlite3 "file:$db?mode=ro" 'SELECT count(*) FROM profiles' 2>/dev/null || echo "?")
        echo "$profiles profiles ($(( loaded + step )) people asked for): resident $(rss); $(sizes)"
    done
    stop
    sqlite_bytes=$(( $(stat -c %s $db) + $(stat -c %s $db-wal 2>/dev/null || echo 0) ))
    echo "database: $sqlite_bytes bytes for $profiles profiles (with their history); $(sizes)"
    ;;
stitched)
    # Resident memory by stitched ids: people on two devices who log in on each (an email hash
    # and the second device's id stitched to every profile), against as many people on one
    # device; read at the end of the load and after a restart, which loads what the database
    # holds.
    for two_devices in 0 1; do
        start examples/benchmark.toml
        $starling loadgen --people "$people" --events "$(( people * 4 ))" --batch 1000 --connections 8 \
            --two-devices $two_devices --prefix "stitched-$two_devices" | grep applied
        echo "two devices: $two_devices; resident after the load $(rss)"
        stop
        start examples/benchmark.toml keep
        profiles=$(sqlite3 "file:$db?mode=ro" 'SELECT count(*) FROM profiles')
        stitched=$(sqlite3 "file:$db?mode=ro" 'SELECT count(*) FROM identities WHERE visitor_id <> profile_id')
        echo "two devices: $two_devices; $profiles profiles, $stitched stitched ids: resident after a restart $(rss)"
        stop
    done
    ;;
disk)
    # A short per-profile history, so that 10 minutes reach the cap: the plateau is
    # people x events_per_profile x bytes per stored event.
    start "$(variant '' $'[retention]\nevents_per_profile = 100\nactions_kept = "1m"')"
    $starling loadgen --people 20000 --events 12000000 --batch 500 --connections 8 --rate 20000 \
        --prefix disk > target/bench/disk-load.log 2>&1 &
    loader=$!
    for minute in $(seq 1 10); do
        sleep 60
        echo "minute $minute: $(sizes), resident $(rss)"
    done
    wait $loader || true
    tail -4 target/bench/disk-load.log
    ;;
recovery)
    start examples/benchmark.toml
    echo "== loading $people profiles"
    $starling loadgen --people "$people" --events "$(( people * 2 ))" --batch 1000 --connections 8 \
        --two-devices 0 --prefix recovery | grep -E 'applied'
    echo "resident memory with $people profiles: $(rss); $(sizes)"
    echo "== full load, then kill -9"
    $starling loadgen --people "$people" --events 2000000 --batch 500 --connections 8 \
        --prefix recovery-live > target/bench/recovery-load.log 2>&1 &
    loader=$!
    sleep 20
    kill -9 "$server"
    wait "$server" 2>/dev/null || true
    killed=$(date +%s.%N)
    echo "killed; $(sizes)"
    kill $loader 2>/dev/null || true
    $starling serve --config examples/benchmark.toml --database $db --plugins target/bench-plugins \
        >> target/bench/server.log 2>&1 &
    server=$!
    until curl -sf localhost:8080/healthz > /dev/null; do sleep 0.05; done
    healthy=$(date +%s.%N)
    curl -sf -X POST localhost:8080/v1/events -H 'content-type: application/json' \
        -d '{"event":"page_view","visitor_id":"after-recovery"}' > /dev/null
    accepted=$(date +%s.%N)
    echo "healthz after $(awk "BEGIN { print $healthy - $killed }") s, an event accepted after $(awk "BEGIN { print $accepted - $killed }") s"
    grep -E 'replayed|cut' target/bench/server.log | tail -3
    ;;
cluster)
    start_cluster
    echo "== one node, embedded log"
    start examples/benchmark.toml
    load --prefix embedded
    stop
    # Node `$1` listening on port `$2`, with its own database.
    node a 8080
    serving 8080
    node b 8081
    sleep 2
    echo "== one node on JetStream (the owner)"
    load --prefix jetstream
    # How far the standby's copy is behind the stream when the load ends, and a second later.
    following() {
        curl -s localhost:8081/v1/cluster | python3 -c 'import json, sys; print(json.load(sys.stdin)["following"])'
    }
    echo "the standby's copy at the end of the load: $(following)"
    sleep 1
    echo "a second later: $(following)"
    echo "== through a standby, which forwards to the owner"
    load --server http://127.0.0.1:8081 --prefix forwarded
    echo "the standby's copy at the end of the load: $(following)"
    echo "== kill -9 the owner under load: time until the standby serves"
    load --server http://127.0.0.1:8081 --resend --prefix failover > target/bench/failover-load.log 2>&1 &
    loader=$!
    sleep 3
    kill -9 "${nodes[0]}"
    killed=$(date +%s.%N)
    serving 8081
    served=$(date +%s.%N)
    echo "the standby served every partition $(awk "BEGIN { print $served - $killed }") s after the kill"
    wait $loader || true
    grep applied target/bench/failover-load.log
    grep -E 'snapshot stored' target/bench/node-a.log | tail -1
    grep -E 'restored|replayed|owns every|outcomes taken|taken in' target/bench/node-b.log | tail -5
    load --server http://127.0.0.1:8081 --prefix failover --verify-only | grep -A10 verified
    echo "stream, buckets and snapshots on disk, three servers: $(du -sb "$dir" | cut -f1) bytes"
    kill "${nodes[@]}" 2>/dev/null || true
    ;;
spread)
    # Placed whole, one node applies every event; spread, each of two nodes applies its share
    # live and follows the other's (docs/cluster.md): the same load, split over both.
    start_cluster
    node a 8080
    serving 8080
    echo "== one node on JetStream owning every partition"
    starling_before=$(cpu_seconds "${nodes[@]}") nats_before=$(cpu_seconds "${nats_pids[@]}") messages_before=$(nats_messages)
    commits_before=$(sqlite_commits)
    load --prefix whole
    cost_per_event "$starling_before" "$nats_before" "$messages_before" "$events" "$commits_before"
    kill "${nodes[@]}" "${nats_pids[@]}" 2>/dev/null || true
    wait "${nodes[@]}" "${nats_pids[@]}" 2>/dev/null || true
    start_cluster
    # How many partitions the node on port `$1` owns.
    owned() {
        curl -sf "localhost:$1/v1/cluster" | python3 -c 'import json, sys; print(len(json.load(sys.stdin).get("owned", [])))' 2> /dev/null || echo 0
    }
    PLACEMENT=spread node a 8080
    until [[ $(owned 8080) -eq 64 ]]; do sleep 0.1; done
    PLACEMENT=spread node b 8081
    until [[ $(owned 8080) -eq 32 && $(owned 8081) -eq 32 ]]; do sleep 0.1; done
    echo "== two nodes, the partitions spread, half the load through each"
    starling_before=$(cpu_seconds "${nodes[@]}") nats_before=$(cpu_seconds "${nats_pids[@]}") messages_before=$(nats_messages)
    commits_before=$(sqlite_commits)
    started=$(date +%s.%N)
    $starling loadgen --server http://127.0.0.1:8080 --people "$people" --events "$(( events / 2 ))" --batch 500 \
        --connections "${CONNECTIONS:-4}" --prefix spread-a > target/bench/spread-a.log 2>&1 &
    through_a=$!
    $starling loadgen --server http://127.0.0.1:8081 --people "$people" --events "$(( events / 2 ))" --batch 500 \
        --connections "${CONNECTIONS:-4}" --prefix spread-b > target/bench/spread-b.log 2>&1 &
    through_b=$!
    wait $through_a $through_b
    elapsed=$(awk "BEGIN { print $(date +%s.%N) - $started }")
    grep applied target/bench/spread-a.log target/bench/spread-b.log
    echo "both loads applied in $elapsed s: $(awk "BEGIN { printf \"%.0f\", $events / $elapsed }") events/s together"
    cost_per_event "$starling_before" "$nats_before" "$messages_before" "$events" "$commits_before"
    for prefix in spread-a spread-b; do
        $starling loadgen --server http://127.0.0.1:8080 --people "$people" --events "$(( events / 2 ))" \
            --prefix $prefix --verify-only | grep verified
    done
    # The stream forgets what both databases and the latest snapshot hold (docs/cluster.md):
    # once both have caught up and a snapshot was stored, each partition keeps its last record.
    stream() {
        curl -sf localhost:8080/v1/cluster | python3 -c 'import json, sys; s = json.load(sys.stdin)["stream"]; print(s["records"], s["bytes"], s["last_position"])'
    }
    for _ in $(seq 120); do
        read -r records bytes written < <(stream)
        (( records <= 128 )) && break
        sleep 0.5
    done
    echo "the stream holds $records records ($bytes bytes, one copy) of the $written written"
    # What two idle nodes cost the servers: heartbeats, leases, and follow rounds finding nothing.
    starling_before=$(cpu_seconds "${nodes[@]}") nats_before=$(cpu_seconds "${nats_pids[@]}") messages_before=$(nats_messages)
    sleep 10
    awk "BEGIN { printf \"idle, per second: CPU of the Starling nodes %.3f s, of the NATS servers %.3f s; %.0f messages into the NATS servers\\n\", ($(cpu_seconds "${nodes[@]}") - $starling_before) / 10, ($(cpu_seconds "${nats_pids[@]}") - $nats_before) / 10, ($(nats_messages) - $messages_before) / 10 }"
    kill "${nodes[@]}" 2>/dev/null || true
    ;;
catchup)
    # A standby started after the owner applied the load follows the whole stream (no snapshot
    # within the run), on a machine otherwise idle: how fast a standby or a takeover applies
    # records when it has the cores to itself.
    start_cluster
    SNAPSHOT_EVERY=1h
    node a 8080
    serving 8080
    load --prefix catchup
    node b 8081
    started=$(date +%s.%N)
    following() {
        curl -sf localhost:8081/v1/cluster | python3 -c '
import json, sys
f = json.load(sys.stdin)["following"]
print(f["applied_position"], f["positions_behind"]) if f else print(0, -1)' 2> /dev/null || echo "0 -1"
    }
    for _ in $(seq 1 12000); do
        read -r applied behind <<< "$(following)"
        [[ $applied -gt 0 && $behind -eq 0 ]] && break
        sleep 0.05
    done
    caught=$(date +%s.%N)
    records=$(grep -o 'records applied records=[0-9]*' target/bench/node-b.log | awk -F= '{ n += $2 } END { print n + 0 }')
    elapsed=$(awk "BEGIN { print $caught - $started }")
    echo "the standby applied $records records (stream position $applied) $elapsed s after it started: $(awk "BEGIN { printf \"%.0f\", $records / $elapsed }") records/s"
    grep -E 'following the stream' target/bench/node-b.log | head -1
    ;;
*)
    echo "unknown benchmark: $what" >&2
    exit 2
    ;;
esac
stop
