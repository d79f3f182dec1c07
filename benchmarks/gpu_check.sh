#!/bin/bash
# The CUDA path on a lent GPU machine (the device tool): every method trained and evaluated with
# --device cuda on MVTec AD bottle, the same clscnf checkpoint evaluated on cpu and on cuda
# (parity) and batch-1 predict; apart, the model tests with device auto (= cuda there).
#
#   here:  bash benchmarks/gpu_check.sh prepare
#          .gpu/ (git-ignored, ~40 MB): a FrEIA wheel (the GPU image lacks it), lite0's weights,
#          bottle resized to 256 x 256 (the whole category is 151 MB; the tool's default input is 256)
#   there: run(command="bash benchmarks/gpu_check.sh runs 2>&1 | tee $OUT/gpu.log", carry=[".gpu"], timeout_s=600)
#          the runs took about 8 minutes on an H100 (2026-11-26); the results JSONs come back in $OUT
#          run(command="bash benchmarks/gpu_check.sh tests", carry=[".gpu"], timeout_s=300)
#          the model tests with device auto (= cuda); they have not run on a GPU yet
#
# DEV=cpu PY=.venv/bin/python FAST="--input-size 64" bash benchmarks/gpu_check.sh runs (or tests)
# is a quick dry run of the script here.
set -u
if [ "${1:-}" = prepare ]; then
  set -e
  SHARED=${SHARED:-../shared}; PY=${PY:-.venv/bin/python}
  rm -rf .gpu && mkdir -p .gpu/whl .gpu/shared/hf-home/hub .gpu/shared/data/mvtec
  $PY -m pip wheel -q --no-deps FrEIA==0.2 -w .gpu/whl
  cp -rL "$SHARED/hf-home/hub/models--timm--tf_efficientnet_lite0.in1k" .gpu/shared/hf-home/hub/
  rm -rf .gpu/shared/hf-home/hub/models--timm--tf_efficientnet_lite0.in1k/blobs
  $PY - "$SHARED/data/mvtec/bottle" .gpu/shared/data/mvtec/bottle <<'PYTHON'
import sys
from pathlib import Path

from PIL import Image

source, target = Path(sys.argv[1]), Path(sys.argv[2])
for path in source.rglob("*.png"):
    out = target / path.relative_to(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    mask = "ground_truth" in path.parts
    Image.open(path).resize((256, 256), Image.NEAREST if mask else Image.BICUBIC).save(out)
PYTHON
  du -sh .gpu
  exit 0
fi

MODE=${1:-runs}
if [ "$MODE" != runs ] && [ "$MODE" != tests ]; then echo "usage: gpu_check.sh prepare|runs|tests" >&2; exit 2; fi
DEV=${DEV:-cuda}; PY=${PY:-python3}; OUTDIR=${OUT:-/tmp/gpu-out}; mkdir -p "$OUTDIR"
if [ "$DEV" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src HF_HOME=$PWD/.gpu/shared/hf-home HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
S=$PWD/.gpu/shared; D=$S/data/mvtec/bottle; R=/tmp/gpu-runs
log() { echo "=== $(date +%T) $*"; }
nvidia-smi -L 2>/dev/null; echo "$(nproc) CPU cores"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
if [ "$MODE" = tests ]; then
  log "model tests on $DEV"
  DEFECTFLOW_SHARED=$S timeout "${TEST_SECONDS:-240}" $PY -m pytest -q -p no:cacheprovider -p no:warnings tests/test_cflow.py tests/test_clscnf.py \
    tests/test_differnet.py tests/test_checkpoint.py tests/test_flows.py tests/test_classifier.py 2>&1 | tail -20
  exit 0
fi
rm -rf $R; mkdir -p $R
for m in cflow clscnf differnet; do
  log "run $m on $DEV"
  $PY -m defectflow.cli run --method $m --data $D --device $DEV --out $R/$m --quiet ${FAST:-} 2>&1 | grep -v -i warning | tail -12
  cp $R/$m/results.json "$OUTDIR/$m-results.json"
done
for d in cpu $DEV; do
  log "eval the clscnf checkpoint on $d"
  $PY -m defectflow.cli eval --checkpoint $R/clscnf/model --data $D --device $d --out $R/eval-$d --overwrite --no-pictures --quiet 2>&1 | grep -v -i warning | tail -7
  cp $R/eval-$d/results.json "$OUTDIR/eval-$d.json"
done
log "predict at batch 1 on $DEV"
for m in cflow clscnf; do
  $PY -m defectflow.cli predict --checkpoint $R/$m/model --device $DEV --batch-size 1 --out $R/predict-$m --quiet $D/test/broken_large $D/test/good 2>&1 | grep -v -i warning | tail -2
done
log done
