#!/usr/bin/env bash
# Create .venv (once) and install defectflow with its test tools into it (extras: DEFECTFLOW_EXTRAS,
# default test; test.sh adds ray). Sourced by quickstart.sh and test.sh; exports HF_HOME for the
# shared weights when present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${DEFECTFLOW_EXTRAS:-test}]"
# Machines without internet keep the pretrained backbones in ../shared/hf-home.
if [ -z "${HF_HOME:-}" ] && [ -d ../shared/hf-home ]; then
    export HF_HOME="$PWD/../shared/hf-home" HF_HUB_OFFLINE=1
fi
