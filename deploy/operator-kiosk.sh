#!/bin/sh
# A panel on the inspection device itself: the operator view full screen in Chromium at idle CPU priority
# (Linux SCHED_IDLE: it runs only on CPU time the line leaves, and a waking line thread pre-empts it at once),
# so the browser's redraws never delay a part. On a saturated device the screen refreshes late; the line
# does not. The view server, `musc-edge view`, runs at nice +10 already.
# Usage: deploy/operator-kiosk.sh [URL]   (default http://127.0.0.1:8750/, `musc-edge view`'s default)
# A panel PC elsewhere on the plant network needs none of this: open the URL of a view started with --bind.
set -eu
url="${1:-http://127.0.0.1:8750/}"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
    echo "operator-kiosk: no chromium on PATH (Debian/Ubuntu: apt install chromium)" >&2
    exit 1
fi
if command -v chrt >/dev/null 2>&1; then
    lower="chrt --idle 0"
else   # no util-linux: the lowest niceness is the next best
    lower="nice -n 19"
fi
exec $lower "$browser" --kiosk --app="$url" --noerrdialogs --disable-translate --no-first-run \
    --disable-background-networking --window-size=1280,800
