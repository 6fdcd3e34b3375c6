"""Exported causal linear attention in onnxruntime: the chunked form (the exporter's default since issue #16) vs
the cumsum prefix form, one dynamic-length export each, run at several lengths. Reports per-call latency and the
peak resident memory of a fresh process running the graph (so the numbers are not polluted by the other form).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/chunked_causal.py [--lengths 1024,4096] [--heads 8] [--dim 64]
        [--out tools/bench/results/chunked_causal.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from machine import describe  # noqa: E402

_CHILD = r"""
import resource, sys, time, numpy as np, onnxruntime as ort
path, n, h, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
so = ort.SessionOptions(); so.intra_op_num_threads = 1
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {i.name: rng.standard_normal((1, h, n, d), dtype=np.float32) for i in sess.get_inputs()}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sess.run(None, feeds)
t = []
for _ in range(3):
    t0 = time.perf_counter(); sess.run(None, feeds); t.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(min(t) * 1e3, (peak - before) / 1024)
"""


def _export(form: str, heads: int, dim: int, path: Path) -> None:
    import torch
    from passes.attention.linear import linear_attention

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return linear_attention(q, k, v, scale=dim ** -0.5, causal=True, causal_form=form)

    s = torch.export.Dim("S", min=2, max=1 << 16)
    args = tuple(torch.randn(1, heads, 100, dim) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        onx = torch.onnx.export(M(), args, dynamic_shapes={"q": {2: s}, "k": {2: s}, "v": {2: s}}, dynamo=True,
                                opset_version=18, verbose=False)
    onx.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--prefix-max", type=int, default=4096, help="skip the prefix form above this N "
                        "(it holds B·H·N·d·(d+1) floats: 17 GiB at N = 16384)")
    parser.add_argument("--out", default="tools/bench/results/chunked_causal.json")
    a = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for form in ("chunked", "prefix"):
            path = Path(tmp) / f"{form}.onnx"
            _export(form, a.heads, a.dim, path)
            for n in (int(x) for x in a.lengths.split(",")):
                if form == "prefix" and n > a.prefix_max:
                    continue
                out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(n), str(a.heads), str(a.dim)],
                                     capture_output=True, text=True, check=True).stdout.split()
                rows.append({"form": form, "n": n, "ms": float(out[0]), "extra_mib": float(out[1])})
    cpu = describe()
    print(f"causal linear attention, onnxruntime 1 thread, B=1 H={a.heads} d={a.dim} — {cpu}")
    print(f"{'form':8} {'N':>6} {'ms':>9} {'extra MiB':>10}")
    for r in rows:
        print(f"{r['form']:8} {r['n']:>6} {r['ms']:>9.1f} {r['extra_mib']:>10.0f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "python": platform.python_version(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
