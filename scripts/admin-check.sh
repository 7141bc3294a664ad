#!/usr/bin/env bash
# Loads the admin page of a running server in headless Chromium, looks up a profile, and takes a
# screenshot. Prints the page's DOM after the lookup, for checking.
#
#   scripts/admin-check.sh URL PROFILE_ID SCREENSHOT.png [ADMIN_TOKEN]
#
# The page reads the token and the profile to look up from its address's fragment
# (`/admin#token=…&profile=…`), which the browser never sends to the server.
set -euo pipefail
url=$1 profile=$2 screenshot=$3 token=${4:-}
find_browser() { command -v chromium || command -v chromium-browser || command -v google-chrome || true; }
browser=$(find_browser)
if [ -z "$browser" ] && command -v apt-get >/dev/null; then
    # Like `starling plugin build` with its toolchains: install what is missing from Debian.
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo -n"
    echo "admin-check: installing Chromium from Debian" >&2
    { $sudo_cmd apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q chromium; } >&2 || true
    browser=$(find_browser)
fi
if [ -z "$browser" ]; then
    echo "admin-check: no Chromium found and it could not be installed (Debian: apt-get install chromium)" >&2
    exit 2
fi
page="$url/admin#profile=$profile"
[ -n "$token" ] && page="$page&token=$token"
profile_dir=$(mktemp -d)
trap 'rm -rf "$profile_dir"' EXIT
# Virtual time lets the page's requests finish before the DOM is dumped or the shot is taken.
flags=(--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run
       --user-data-dir="$profile_dir" --virtual-time-budget=10000 --window-size=1400,1100)
"$browser" "${flags[@]}" --screenshot="$screenshot" "$page" 2>/dev/null >&2
"$browser" "${flags[@]}" --dump-dom "$page" 2>/dev/null
