#!/usr/bin/env bash
# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
# Without root or apt-get the tests that need it skip and say why.
set -u
if command -v chromium >/dev/null 2>&1 || [ -x "${SP2OT_CHROMIUM:-/usr/bin/chromium}" ]; then
    echo "Chromium: present"
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Chromium (Debian package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
        >/dev/null || echo "Chromium: could not be installed (its tests will skip)"
fi
command -v chromium >/dev/null 2>&1 && echo "Chromium: present" || echo "Chromium: absent (its tests will skip)"
exit 0
