#!/usr/bin/env bash
# Chromium for the play page's browser test (tests/test_play_browser.py drives it with Playwright).
# Debian's package, never `playwright install` (that downloads a browser build from outside the registries).
# Without root or apt-get it only says so: the browser test then skips, naming the reason.
set -euo pipefail
for b in chromium chromium-browser; do
  if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (apt-get; about a minute)"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
else
  echo "chromium not found and cannot be installed here (needs root and apt-get):" \
       "tests/test_play_browser.py will be skipped; install chromium or set MINWM_CHROMIUM" >&2
fi
