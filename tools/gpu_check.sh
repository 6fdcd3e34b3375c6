#!/usr/bin/env bash
# Run CUDA artefacts on a GPU machine and compare with onnxruntime (CPU): static builds of a few attention models,
# and symbolic builds (batch and length ranges) each served at two shapes (tools/gpu_check.py).
# Usage: tools/gpu_check.sh [sm_80|sm_90]   (default: detected with nvidia-smi)
# Numbers go to $GPU_CHECK_JSON (default tools/bench/results/gpu_check_<target>.json).
# Exits 0 when every model matches within 1e-4 (abs+rel), 1 on a mismatch, 2 when there is no GPU / setup fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TVM_NUM_THREADS=${TVM_NUM_THREADS:-2}
ARCH=${1:-}
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no GPU on this machine (nvidia-smi missing or lists no device); nothing run" >&2
  exit 2
fi
if [[ -z "$ARCH" ]]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
  ARCH="sm_${cap}"
fi
case "$ARCH" in sm_80|sm_86|sm_89) TGT=cuda-sm80 ;; sm_90*|sm_100*|sm_120*) TGT=cuda-sm90 ;;
  *) echo "gpu_check: unsupported arch $ARCH" >&2; exit 2 ;; esac
JSON=${GPU_CHECK_JSON:-tools/bench/results/gpu_check_${TGT}.json}
set +e
"$PY" tools/gpu_check.py --target "$TGT" --json "$JSON"
rc=$?
set -e
exit $rc
