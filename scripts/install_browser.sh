#!/usr/bin/env bash
# Debian's Chromium for tests/test_mlflow_ui.py (driven by Playwright, which must not download a
# browser of its own: that needs a network the test machines do not have). Idempotent: does
# nothing when /usr/bin/chromium is there. Needs root (apt-get).
set -euo pipefail
if [[ -x /usr/bin/chromium ]]; then
    exit 0
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
