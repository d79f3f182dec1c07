#!/usr/bin/env bash
# Set up and run the test suite (a few minutes on 2 CPU cores).
set -euo pipefail
# the Ray executor's tests need Ray (the ray extra); they start a local Ray instance themselves
DEFECTFLOW_EXTRAS=test,ray
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# The HTML report is checked in headless Chromium; install it where we may (root with apt).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing chromium for the HTML report test..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
exec .venv/bin/python -m pytest -q "$@"
