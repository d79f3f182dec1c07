#!/usr/bin/env bash
# Set up and run the main job on the built-in default: CFlow-AD on elpv solar cells.
# Extra arguments go to `defectflow run` (e.g. --data DIR, --method, --meta-epochs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/defectflow run "$@"
