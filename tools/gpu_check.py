"""CUDA artefacts on a GPU vs onnxruntime (CPU); run through tools/gpu_check.sh, which picks the target.

1. Static builds of a few attention models (softmax + MatMul, com.microsoft Attention / MultiHeadAttention, ONNX 23
   Attention, causal GQA SDPA, linear attention): each artefact against onnxruntime within 1e-4 (abs + rel).
2. Symbolic builds, one artefact per model served at two shapes: the linear-attention block with batch and length
   symbolic (``--shape x=1..8,1..4096,32``, ranges recorded in the metadata), and the real MiniLM
   (``--shape input_ids=1..8,1..512``) when its package is installed.  Each shape: max error vs onnxruntime and
   the median ms per call of the CUDA artefact (device synchronized) and of onnxruntime on the CPU (2 threads).

Writes every number to the JSON file given as ``--json``.  Exit status: 0 every output matches, 1 a mismatch or a
failed build/run, 2 no CUDA device (nothing is compiled then).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "targets"))

TOL = 1e-4


def _gpu_name() -> str | None:
    """Name of CUDA device 0 as TVM sees it, or None when there is none."""
    import tvm

    dev = tvm.cuda(0)
    if not dev.exist:
        return None
    return str(getattr(dev, "device_name", "cuda:0"))


def _median_ms(fn, budget_s: float = 1.0, most: int = 200) -> float:
    fn()
    fn()
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < most and (len(times) < 5 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 4)


def _compare(got: list, want: list) -> tuple[bool, float]:
    import numpy as np

    ok = all(g.shape == w.shape and np.allclose(g, w, atol=TOL, rtol=TOL) for g, w in zip(got, want))
    err = max(float(np.max(np.abs(g - w) / (TOL + np.abs(w)))) for g, w in zip(got, want))
    return ok, err


def static_cases(tgt: str, out: str) -> list[dict]:
    """Section 1: static builds, one row per model."""
    import numpy as np
    import torch

    from targets import Runner, compile_model
    from tgt_models import (LinearAttention, SDPABlock, ms_attention_model, ms_mha_model, onnx23_attention_model,
                            ort_run, softmax_matmul_model, to_onnx)

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
    rows = []
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
            ok, err = _compare(list(Runner(path).run(feeds).values()), ort_run(proto, feeds))
            rows.append({"model": name, "ok": ok, "max_scaled_err": err})
        except Exception as exc:  # noqa: BLE001 - reported and counted as a failure
            rows.append({"model": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        r = rows[-1]
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {name}: " +
              (f"max scaled error {r['max_scaled_err']:.2e}" if "max_scaled_err" in r else r["error"]), flush=True)
    return rows


def _symbolic_rows(label: str, model, tgt: str, shapes: dict, feeds_at: list[dict], out: str) -> list[dict]:
    """Compile ``model`` once with range ``shapes``; run it at each feed dict vs onnxruntime; one row per shape."""
    from targets import Runner, compile_model
    from targets.bench import ort_session

    path = os.path.join(out, f"{label}_symbolic.so")
    try:
        t0 = time.perf_counter()
        meta = compile_model(model, tgt, path, shapes=shapes)
        compile_s = round(time.perf_counter() - t0, 1)
        runner = Runner(path)
        sess = ort_session(model, 2)
    except Exception as exc:  # noqa: BLE001
        row = {"model": label, "ok": False, "error": f"build: {type(exc).__name__}: {str(exc)[:300]}"}
        print(f"FAIL {label} (symbolic): {row['error']}", flush=True)
        return [row]
    rows = []
    for feeds in feeds_at:
        shape = {k: list(v.shape) for k, v in feeds.items()}
        try:
            want = sess.run(None, feeds)
            ok, err = _compare(list(runner.run(feeds).values()), want)
            call = runner.prepare(feeds)
            row = {"model": label, "shapes": shape, "ok": ok, "max_scaled_err": err,
                   "cuda_ms": _median_ms(call), "ort_cpu_ms": _median_ms(lambda: sess.run(None, feeds)),
                   "ranges": meta.get("ranges"), "compile_s": compile_s}
        except Exception as exc:  # noqa: BLE001
            row = {"model": label, "shapes": shape, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        rows.append(row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {label} (symbolic) at {shape}: " +
              (f"max scaled error {row['max_scaled_err']:.2e}, CUDA {row['cuda_ms']} ms, ORT CPU "
               f"{row['ort_cpu_ms']} ms" if "max_scaled_err" in row else row["error"]), flush=True)
    return rows


def symbolic_cases(tgt: str, out: str) -> list[dict]:
    """Section 2: one symbolic artefact per model, two shapes each."""
    import numpy as np
    import torch
    from torch.export import Dim

    from tgt_models import LinearAttention

    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    model = LinearAttention().eval()
    batch, length = Dim("batch", min=1, max=8), Dim("length", min=2, max=4096)
    prog = torch.onnx.export(model, (torch.randn(2, 16, 32),), dynamo=True, input_names=["x"], verbose=False,
                             dynamic_shapes=({0: batch, 1: length},))
    lin_path = os.path.join(out, "linear_attention_symbolic.onnx")
    prog.save(lin_path)
    rows = _symbolic_rows("linear_attention", lin_path, tgt, {"x": [(1, 8), (1, 4096), 32]},
                          [{"x": rng.standard_normal(s).astype(np.float32)} for s in ((1, 16, 32), (3, 1000, 32))],
                          out)
    try:
        import rewrite
        from rewrite.hf import minilm_path
        from rewrite.io import load_model

        folder = minilm_path()
    except Exception as exc:  # noqa: BLE001 - MiniLM is optional on the GPU machine
        print(f"skip MiniLM (symbolic): {type(exc).__name__}: {exc}", flush=True)
        return rows + [{"model": "MiniLM", "skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}]
    onnx_path = os.path.join(out, "minilm.onnx")
    rewrite.export(load_model(folder), onnx_path)

    def feeds(b: int, n: int) -> dict:
        mask = np.ones((b, n), np.int64)
        mask[-1, n - n // 4:] = 0
        return {"input_ids": rng.integers(0, 30000, (b, n)).astype(np.int64), "attention_mask": mask,
                "token_type_ids": np.zeros((b, n), np.int64)}

    import onnx

    names = [i.name for i in onnx.load(onnx_path, load_external_data=False).graph.input]
    at = [{k: v for k, v in feeds(b, n).items() if k in names} for b, n in ((1, 16), (8, 128))]
    return rows + _symbolic_rows("MiniLM", onnx_path, tgt, {"input_ids": [(1, 8), (1, 512)]}, at, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="cuda-sm80 or cuda-sm90")
    ap.add_argument("--json", required=True, help="file the numbers are written to")
    args = ap.parse_args(argv)
    gpu = _gpu_name()
    if gpu is None:
        print("gpu_check: TVM sees no CUDA device (tvm.cuda(0) does not exist); nothing run", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as out:
        static = static_cases(args.target, out)
        symbolic = symbolic_cases(args.target, out)
    rows = static + [r for r in symbolic if "skipped" not in r]
    bad = sum(1 for r in rows if not r["ok"])
    report = {"target": args.target, "gpu": gpu, "tolerance": TOL, "static": static, "symbolic": symbolic,
              "passed": len(rows) - bad, "failed": bad, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print(f"gpu_check {args.target} on {gpu}: {len(rows) - bad}/{len(rows)} match; numbers in {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
