#!/usr/bin/env bash
# Soak run: scripts/soak.sh [MINUTES] (default 30). See scripts/soak.py.
set -euo pipefail
exec python3 "$(dirname "$0")/soak.py" "$@"
