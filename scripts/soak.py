#!/usr/bin/env python3
"""Soak run (BENCHMARKS.md "Soak"): the example configuration (enrichers in Rust, Python,
JavaScript and C) on a release server for MINUTES, at half the throughput measured first, with
stitching (loadgen's two-device people), an import and a deletion each minute, and a flaky
destination (10% answered 500, 1% never answered) behind every action. Each minute: resident
memory, size on disk, ingestion queue depth, actions pending, and the p99 of 50 single-event requests. Passes
when memory and disk are flat after warm-up (the median of the second half within 10% of the
first half's) and `starling loadgen --verify` finds 0 mismatches.

Usage: scripts/soak.sh [MINUTES]   (run from anywhere; builds what it needs)"""

import http.server, json, os, random, re, shutil, signal, socketserver, statistics, subprocess, sys, threading, time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINUTES = int(sys.argv[1]) if len(sys.argv) > 1 else 30
WARM_UP = max(1, MINUTES // 6)
PORT = 8097
BASE = f"http://127.0.0.1:{PORT}"
STARLING = os.path.join(ROOT, "target/release/starling")
WORK = os.path.join(ROOT, "target/soak")


class Flaky(http.server.BaseHTTPRequestHandler):
    """The outside services: 10% of calls answered 500, 1% never answered."""

    calls = {"ok": 0, "500": 0, "hung": 0}

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        roll = random.random()
        if roll < 0.01:
            Flaky.calls["hung"] += 1
            time.sleep(120)
            return
        status = 500 if roll < 0.11 else 200
        Flaky.calls["ok" if status == 200 else "500"] += 1
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def run(*args, **kw):
    return subprocess.run(args, check=True, cwd=ROOT, **kw)


def get(path):
    with urllib.request.urlopen(BASE + path, timeout=30) as r:
        return r.read().decode()


def post(path, body):
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def disk_mib():
    total = 0
    for dirpath, _, files in os.walk(WORK):
        for name in files:
            if name.startswith("starling.db"):
                total += os.path.getsize(os.path.join(dirpath, name))
    for dirpath, _, files in os.walk(os.path.join(WORK, "starling.db.log")):
        total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in files)
    return total / 2**20


def queue_depths():
    """Requests queued for ingestion, and actions waiting in the outbox."""
    metrics = get("/metrics").splitlines()
    total = lambda name: sum(float(l.split()[-1]) for l in metrics if l.startswith(name + "{"))
    return total("starling_ingest_queue_depth"), total("starling_actions_pending")


def probe_p99(minute):
    """p99 of 50 single-event requests, in ms."""
    times = []
    for i in range(50):
        started = time.perf_counter()
        post("/v1/events", {"event": "page_view", "visitor_id": f"probe-{minute}-{i}", "data": {"category": "hats"}})
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[int(len(times) * 0.99) - 1]


def side_work(minute):
    """Stitching by login, an import of store purchases for them, a deletion."""
    rows = "email_hash,amount,store,bought_at\n"
    for i in range(20):
        post("/v1/events", {"event": "login", "visitor_id": f"side-{minute}-{i}", "data": {"email_hash": f"sidehash-{minute}-{i}"}})
        rows += f"sidehash-{minute}-{i},{10 + i},store-{i % 3},2026-01-01T10:00:00Z\n"
    path = os.path.join(WORK, f"import-{minute}.csv")
    with open(path, "w") as f:
        f.write(rows)
    run(STARLING, "import", path, "--definition", "store_purchases", "--server", BASE, stdout=subprocess.DEVNULL)
    run(STARLING, "profile", "delete", f"side-{minute}-0", "--server", BASE, stdout=subprocess.DEVNULL)


def main():
    run("cargo", "build", "--release", "-p", "starling-cli")
    run(STARLING, "plugin", "build", "connectors")
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    config = open(os.path.join(ROOT, "examples/starling.toml")).read()
    config = re.sub(r'(?m)^listen = .*', f'listen = "127.0.0.1:{PORT}"', config)
    config = re.sub(r'(?m)^database = .*', f'database = "{WORK}/starling.db"', config)
    config = re.sub(r'(?m)^plugins = .*', f'plugins = "{ROOT}/target/plugins"', config)
    # Event history kept 5 minutes (instead of 90 days), so that within the run pruning
    # balances growth and the size on disk can level off.
    config = config.replace("[retention]\n", "[retention]\nevents = \"5m\"\nactions_kept = \"5m\"\n", 1)
    # Every action may have 32 calls in flight: with 1% of calls never answered, each holding a
    # slot until the connector's 5 s deadline, the default 4 delivers about 70 calls a second,
    # fewer than `large_orders` fires at this rate, and its backlog would grow for the whole run.
    config = config.replace("[[action]]\n", "[[action]]\nconcurrency = 32\n")
    with open(os.path.join(WORK, "starling.toml"), "w") as f:
        f.write(config)
    receiver = socketserver.ThreadingTCPServer(("127.0.0.1", 9999), Flaky)
    receiver.daemon_threads = True
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    log = open(os.path.join(WORK, "server.log"), "w")
    server = subprocess.Popen([STARLING, "serve", "--config", os.path.join(WORK, "starling.toml")], stdout=log, stderr=log)
    try:
        for _ in range(600):
            try:
                get("/healthz")
                break
            except OSError:
                time.sleep(0.5)
        # The ceiling, on people of their own.
        out = subprocess.run([STARLING, "loadgen", "--server", BASE, "--people", "5000", "--events", "40000", "--prefix", "max"],
                             check=True, capture_output=True, text=True).stdout
        ceiling = float(re.search(r"([\d.]+) events/s", out).group(1))
        rate = int(ceiling / 2)
        print(f"ceiling {ceiling:.0f} events/s; soaking at {rate} events/s for {MINUTES} minutes", flush=True)
        load = subprocess.Popen([STARLING, "loadgen", "--server", BASE, "--people", "50000", "--rate", str(rate),
                                 "--events", str(rate * 60 * MINUTES), "--prefix", "soak", "--verify"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rows = []
        started = time.time()
        print("| minute | resident MiB | on disk MiB | ingestion queue | actions pending | p99 of 50 requests (ms) |", flush=True)
        print("|---|---|---|---|---|---|", flush=True)
        for minute in range(1, MINUTES + 1):
            side_work(minute)
            time.sleep(max(0, started + 60 * minute - time.time()))
            row = (minute, rss_mib(server.pid), disk_mib(), *queue_depths(), probe_p99(minute))
            rows.append(row)
            print("| %d | %.0f | %.0f | %.0f | %.0f | %.1f |" % row, flush=True)
        out = load.communicate()[0]
        print(out.strip())
        verified = re.search(r"verified (\d+) people: (\d+) mismatches", out)
        after = [r for r in rows if r[0] > WARM_UP]
        half = len(after) // 2
        # Medians, not peaks: resident memory swings by 100 MiB from minute to minute (caches
        # filling and emptying), and one high sample says nothing about a trend.
        def growth(i):
            if not half:
                return 1.0, 1.0
            first, second = [r[i] for r in after[:half]], [r[i] for r in after[half:]]
            return statistics.median(second) / statistics.median(first), max(second) / max(first)
        (mem_growth, mem_peaks), (disk_growth, disk_peaks) = growth(1), growth(2)
        print(f"after warm-up (minute {WARM_UP}): second half / first half, medians: memory {mem_growth:.2f}, "
              f"disk {disk_growth:.2f} (peaks: {mem_peaks:.2f}, {disk_peaks:.2f}); destination calls {Flaky.calls}")
        ok = verified and verified.group(2) == "0" and load.returncode == 0 and mem_growth <= 1.10 and disk_growth <= 1.10
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
