#!/usr/bin/env bash
# Installs, once and pinned, what the ingestion tests drive Starling with: the tracking libraries
# people run (Segment's and RudderStack's Python SDKs and Tealium's Python library in a virtual
# environment at target/clients/venv; Segment's Node library and analytics.js in
# tests/clients/node_modules, with playwright-core to drive Chromium), and Chromium from Debian.
# Safe to run from several tests at once; prints nothing when all is in place.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
clients=$root/tests/clients
mkdir -p "$root/target/clients"
exec 9>"$root/target/clients/.lock"
flock 9

venv=$root/target/clients/venv
if ! cmp -s "$clients/requirements.txt" "$venv/.installed" 2>/dev/null; then
    echo "clients: installing the Python tracking libraries" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$clients/requirements.txt" >&2
    cp "$clients/requirements.txt" "$venv/.installed"
fi

if ! cmp -s "$clients/package-lock.json" "$clients/node_modules/.installed" 2>/dev/null; then
    echo "clients: installing the Node tracking libraries" >&2
    (cd "$clients" && npm ci --no-audit --no-fund --loglevel=error >&2)
    cp "$clients/package-lock.json" "$clients/node_modules/.installed"
fi

if ! command -v chromium >/dev/null; then
    echo "clients: installing Chromium from Debian" >&2
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo -n"
    { $sudo_cmd apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q chromium; } >&2
fi
