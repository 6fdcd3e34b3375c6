#!/usr/bin/env bash
# Run CUDA artefacts of a few models on a GPU machine and compare with onnxruntime (CPU).
# Usage: tools/gpu_check.sh [sm_80|sm_90]   (default: detected with nvidia-smi)
# Exits 0 when every model matches within 1e-4 (abs+rel), 1 on a mismatch, 2 when no GPU / setup fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TVM_NUM_THREADS=${TVM_NUM_THREADS:-2}
ARCH=${1:-}
if [[ -z "$ARCH" ]]; then
  if ! command -v nvidia-smi >/dev/null; then echo "gpu_check: no nvidia-smi (no GPU?)" >&2; exit 2; fi
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
  ARCH="sm_${cap}"
fi
case "$ARCH" in sm_80|sm_86|sm_89) TGT=cuda-sm80 ;; sm_90*|sm_100*|sm_120*) TGT=cuda-sm90 ;;
  *) echo "gpu_check: unsupported arch $ARCH" >&2; exit 2 ;; esac
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$PY" - "$TGT" "$OUT" <<'PYEOF'
import sys, os
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "tests", "targets"))
import numpy as np, torch
from targets import compile_model, Runner
from tgt_models import (SDPABlock, LinearAttention, ms_attention_model, ms_mha_model, onnx23_attention_model,
                    softmax_matmul_model, ort_run, to_onnx)
tgt, out = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
x = torch.randn(2, 16, 32)
cases = {
    "softmax_matmul": softmax_matmul_model(),
    "ms_attention": ms_attention_model(),
    "ms_mha": ms_mha_model(),
    "onnx23_attention": onnx23_attention_model(),
    "sdpa_causal_gqa": to_onnx(SDPABlock(kv_heads=2, causal=True, scale=0.3), (x,), ["x"]),
    "linear_attention": to_onnx(LinearAttention(), (x,), ["x"]),
}
bad = 0
for name, proto in cases.items():
    feeds = {}
    for vi in proto.graph.input:
        shp = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        et = vi.type.tensor_type.elem_type
        feeds[vi.name] = (rng.standard_normal(shp).astype(np.float32) if et == 1 else
                          np.ones(shp, np.int32) if et == 6 else np.tril(np.ones(shp, bool)))
    path = os.path.join(out, name + ".so")
    try:
        compile_model(proto, tgt, path)
        got = Runner(path).run(feeds)
        ref = ort_run(proto, feeds)
        err = max(float(np.max(np.abs(g - r) / (1e-4 + np.abs(r)))) for g, r in zip(got.values(), ref))
        ok = all(np.allclose(g, r, atol=1e-4, rtol=1e-4) for g, r in zip(got.values(), ref))
    except Exception as exc:  # report and count as failure
        print(f"FAIL {name}: {type(exc).__name__}: {exc}")
        bad += 1
        continue
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max scaled error {err:.2e}")
    bad += 0 if ok else 1
print(f"gpu_check {tgt}: {len(cases) - bad}/{len(cases)} match")
sys.exit(1 if bad else 0)
PYEOF
