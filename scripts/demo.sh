#!/usr/bin/env bash
# Runs the Starling demo: builds the server and the example plugins, starts a loopback receiver
# standing in for the webhook's destination, and serves examples/starling.toml on
# http://127.0.0.1:8080 with its SQLite file in target/demo/. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build -p starling-cli
./target/debug/starling plugin build connectors
./target/debug/starling config check examples/starling.toml
mkdir -p target/demo

# The example actions POST to 127.0.0.1:9999: print what arrives there.
python3 - <<'PY' &
import http.server, json
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        print(f"[receiver] {self.command} {self.path} idempotency-key={self.headers.get('idempotency-key')} {body.decode()}", flush=True)
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 9999), Receiver).serve_forever()
PY
receiver=$!
trap 'kill $receiver 2>/dev/null || true' EXIT

cat <<'HELP'

Starling is starting on http://127.0.0.1:8080 (the first start compiles the Python and JavaScript
plugins, about a minute; later starts use the compiled-code cache). In another terminal, try:

  curl -s -XPOST localhost:8080/v1/events -d '{"events": [
    {"event": "page_view", "visitor_id": "anon-1", "data": {"category": "shoes", "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Version/17.4 Mobile/15E148 Safari/604.1"}},
    {"event": "purchase",  "visitor_id": "anon-1", "data": {"order_total": 320, "email": "ann@example.com"}},
    {"event": "purchase",  "visitor_id": "anon-1", "data": {"order_total": 250}}]}'
  curl -s localhost:8080/v1/profiles/anon-1
  curl -s localhost:8080/v1/audiences
  curl -s localhost:8080/v1/profiles/anon-1/explain/recent_buyers

A second device logging in with the same email hash is stitched into the same profile:

  curl -s -XPOST localhost:8080/v1/events -d '{"events": [
    {"event": "login", "visitor_id": "anon-1", "data": {"email_hash": "b58996c504c5638798eb6b511e6f49af"}},
    {"event": "page_view", "visitor_id": "tablet-7", "data": {"category": "bags"}},
    {"event": "login", "visitor_id": "tablet-7", "data": {"email_hash": "b58996c504c5638798eb6b511e6f49af"}}]}'
  curl -s localhost:8080/v1/profiles/tablet-7/identity
  ./target/debug/starling profile unstitch tablet-7
  curl -s localhost:8080/v1/actions

Offline store purchases fill omnichannel attributes; follow a visitor live; delete a person:

  ./target/debug/starling import examples/store-purchases.csv --definition store_purchases
  ./target/debug/starling trace anon-1         # then send more events for anon-1
  ./target/debug/starling profile delete anon-1
  curl -s localhost:8080/metrics

The admin page: http://127.0.0.1:8080/admin

HELP
./target/debug/starling serve --config examples/starling.toml
