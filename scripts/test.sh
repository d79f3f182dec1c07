#!/usr/bin/env bash
# Set up and run the test suite (a few minutes on 2 CPU cores).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m pytest -q "$@"
