"""Causal linear-attention prefill exported to ONNX, in onnxruntime: the chunked form (the ``chunked`` row is
exported with the default ``causal_form=auto``, which is the chunked form in every export since session 8) vs the
cumsum prefix form, against torch's causal SDPA (softmax) at the same N.

Each form is one dynamic-length export of self-attention (q, k, v of one length, as in a model layer, so the
exporter sees one length symbol). Every cell runs in a fresh process: it times the call (best of ``--repeats``
after one warm-up; wall time and the process's CPU time, which a loaded host inflates less — both one thread)
and samples the process's resident memory with psutil every millisecond while running; "extra
MiB" is the peak RSS during the calls minus the RSS just before the first call (session built, inputs made), i.e.
what the prefill itself allocates. The cells alternate form by form at each N, so load on a shared host shifts all
of them alike.

``--cores`` instead compares the causal core alone (φ(q), φ(k), [v, 1] in, prefix products out) as the default
export builds it (chunks gathered from the padded row grid, all chunks at once) with an ONNX ``Loop`` over chunks
carrying the F×E state (:mod:`chunk_loop_onnx`), both C = 64, after checking they agree at N = 1000.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/chunked_causal.py [--lengths 1024,4096,16384] [--heads 8]
        [--dim 64] [--prefix-max 4096] [--repeats 3] [--out tools/bench/results/chunked_causal.json] [--cores]
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

#: peak-RSS sampler shared by the child scripts: ``with Peak() as p: ...`` then ``p.extra_mib``
_PEAK = r"""
import threading, time, psutil
class Peak:
    def __enter__(self):
        self.proc = psutil.Process(); self.base = self.proc.memory_info().rss; self.peak = self.base
        self.stop = False; self.t = threading.Thread(target=self._run, daemon=True); self.t.start(); return self
    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss); time.sleep(0.001)
    def __exit__(self, *exc):
        self.stop = True; self.t.join(); self.peak = max(self.peak, self.proc.memory_info().rss)
        self.extra_mib = (self.peak - self.base) / 2**20
"""

_ORT_CHILD = _PEAK + r"""
import sys, numpy as np, onnxruntime as ort
path, n, h, d, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
# static dims as declared; the dynamic ones: the length (axis 2) = n, the batch = 1
feeds = {i.name: rng.standard_normal([x if isinstance(x, int) else (n if a == 2 else 1) for a, x in
                                      enumerate(i.shape)], dtype=np.float32) for i in sess.get_inputs()}
t, c = [], []
with Peak() as p:
    for _ in range(reps + 1):
        t0, c0 = time.perf_counter(), time.process_time(); sess.run(None, feeds)
        t.append(time.perf_counter() - t0); c.append(time.process_time() - c0)
print(min(t[1:]) * 1e3, min(c[1:]) * 1e3, p.extra_mib)
"""

_SDPA_CHILD = _PEAK + r"""
import sys, torch
n, h, d, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
t, c = [], []
with torch.no_grad(), Peak() as p:
    for _ in range(reps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        t.append(time.perf_counter() - t0); c.append(time.process_time() - c0)
print(min(t[1:]) * 1e3, min(c[1:]) * 1e3, p.extra_mib)
"""


def _export(form: str, heads: int, dim: int, path: Path) -> None:
    import torch
    from passes.attention.linear import linear_attention

    class SelfAttention(torch.nn.Module):
        def forward(self, q, k, v):
            # one length for q, k, v (as in a model layer, where they are projections of one input): export gives
            # three inputs distinct symbols even under one Dim until these checks unify them
            torch._check(k.shape[2] == q.shape[2])
            torch._check(v.shape[2] == q.shape[2])
            return linear_attention(q, k, v, scale=dim ** -0.5, causal=True,
                                    causal_form="auto" if form == "chunked" else form)

    n = torch.export.Dim("N", min=2, max=1 << 17)
    dyn = {"q": {2: n}, "k": {2: n}, "v": {2: n}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        onx = torch.onnx.export(SelfAttention(), tuple(torch.randn(1, heads, 100, dim) for _ in range(3)),
                                dynamic_shapes=dyn, dynamo=True, opset_version=18, verbose=False)
    onx.save(str(path))


def _export_core(heads: int, dim: int, chunk: int, path: Path) -> None:
    """The causal core alone (φ(q), φ(k), [v, 1] → Σ-prefix products), default form, one dynamic length."""
    import torch
    from passes.attention.linear_core import causal_apply

    class Core(torch.nn.Module):
        def forward(self, fq, fk, v):
            torch._check(fk.shape[2] == fq.shape[2])
            torch._check(v.shape[2] == fq.shape[2])
            return causal_apply(fq, fk, v, chunk=chunk)

    n = torch.export.Dim("N", min=2, max=1 << 17)
    args = (torch.rand(1, heads, 100, dim), torch.rand(1, heads, 100, dim), torch.randn(1, heads, 100, dim + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        onx = torch.onnx.export(Core(), args, dynamic_shapes={"fq": {2: n}, "fk": {2: n}, "v": {2: n}},
                                dynamo=True, opset_version=18, verbose=False)
    onx.save(str(path))


def _check_cores(gather: Path, loop: Path, heads: int, dim: int) -> float:
    """Largest difference of the two cores' outputs at N = 1000 (not a chunk multiple), relative to max |out|."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    feeds = {"fq": rng.random((1, heads, 1000, dim), dtype=np.float32),
             "fk": rng.random((1, heads, 1000, dim), dtype=np.float32),
             "v": rng.standard_normal((1, heads, 1000, dim + 1), dtype=np.float32)}
    outs = []
    for path in (gather, loop):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {i.name: feeds[n] for i, n in zip(sess.get_inputs(), ("fq", "fk", "v"))})[0])
    return float(np.abs(outs[0] - outs[1]).max() / np.abs(outs[1]).max())


def _cores(a) -> None:
    """--cores: the causal core as the gather-chunked export (the default) vs an ONNX Loop over chunks, same
    chunk (64), in onnxruntime, one thread, each cell in a fresh process."""
    from chunk_loop_onnx import loop_core_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"gather": Path(tmp) / "gather.onnx", "loop": Path(tmp) / "loop.onnx"}
        _export_core(a.heads, a.dim, 64, paths["gather"])
        paths["loop"].write_bytes(loop_core_model(a.heads, a.dim, a.dim + 1, 64).SerializeToString())
        diff = _check_cores(paths["gather"], paths["loop"], a.heads, a.dim)
        if diff > 1e-4:
            raise SystemExit(f"the Loop core differs from the gather core by {diff:.2e}")
        for n in (int(x) for x in a.lengths.split(",")):
            for form in ("gather", "loop"):
                ms, cpu_ms, mib = _child(_ORT_CHILD, paths[form], n, a.heads, a.dim, a.repeats)
                rows.append({"core": form, "n": n, "ms": ms, "cpu_ms": cpu_ms, "extra_mib": mib})
                print(f"{form} N={n}: {ms:.1f} ms, {mib:.0f} MiB", file=sys.stderr)
    cpu = describe()
    print(f"causal core, onnxruntime 1 thread, B=1 H={a.heads} F={a.dim} E={a.dim + 1} C=64 — {cpu}; best of "
          f"{a.repeats}; cores agree to {diff:.1e}")
    print(f"{'core':8} {'N':>6} {'wall ms':>9} {'CPU ms':>9} {'extra MiB':>10}")
    for r in rows:
        print(f"{r['core']:8} {r['n']:>6} {r['ms']:>9.1f} {r['cpu_ms']:>9.1f} {r['extra_mib']:>10.0f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "python": platform.python_version(), "heads": a.heads, "dim": a.dim,
                               "chunk": 64, "threads": 1, "repeats": a.repeats, "agree": diff, "rows": rows},
                              indent=1))
    print(f"wrote {out}")


def _child(script: str, *args) -> tuple[float, float, float]:
    """(wall ms, process CPU ms, extra MiB) of one cell, run in a fresh process."""
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, check=True)
    ms, cpu_ms, mib = out.stdout.split()[-3:]
    return float(ms), float(cpu_ms), float(mib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--prefix-max", type=int, default=4096, help="skip the prefix form above this N "
                        "(it holds B·H·N·d·(d+1) floats: 8.5 GiB at N = 16384)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell after one warm-up")
    parser.add_argument("--out", default=None, help="JSON path (default tools/bench/results/chunked_causal.json, "
                        "with --cores chunked_causal_cores.json)")
    parser.add_argument("--cores", action="store_true", help="compare the causal core as exported (gathered "
                        "chunks) with an ONNX Loop over chunks instead (tools/bench/chunk_loop_onnx.py)")
    a = parser.parse_args()
    if a.out is None:
        a.out = f"tools/bench/results/chunked_causal{'_cores' if a.cores else ''}.json"
    if a.cores:
        _cores(a)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for form in ("chunked", "prefix"):
            paths[form] = Path(tmp) / f"{form}.onnx"
            _export(form, a.heads, a.dim, paths[form])
        for n in (int(x) for x in a.lengths.split(",")):
            for form in ("chunked", "prefix", "sdpa"):
                if form == "prefix" and n > a.prefix_max:
                    continue
                if form == "sdpa":
                    ms, cpu_ms, mib = _child(_SDPA_CHILD, n, a.heads, a.dim, a.repeats)
                else:
                    ms, cpu_ms, mib = _child(_ORT_CHILD, paths[form], n, a.heads, a.dim, a.repeats)
                rows.append({"form": form, "runtime": "torch" if form == "sdpa" else "onnxruntime", "n": n,
                             "ms": ms, "cpu_ms": cpu_ms, "extra_mib": mib})
                print(f"{form} N={n}: {ms:.1f} ms, {mib:.0f} MiB", file=sys.stderr)
    by = {(r["form"], r["n"]): r for r in rows}
    for r in rows:
        sdpa = by.get(("sdpa", r["n"]))
        if r["form"] != "sdpa" and sdpa:
            r["speedup_vs_sdpa"] = sdpa["ms"] / r["ms"]
            r["cpu_speedup_vs_sdpa"] = sdpa["cpu_ms"] / r["cpu_ms"]
    cpu = describe()
    print(f"causal attention prefill, 1 thread, B=1 H={a.heads} d={a.dim} — {cpu}; best of {a.repeats}")
    print(f"{'form':8} {'runtime':12} {'N':>6} {'wall ms':>9} {'CPU ms':>9} {'extra MiB':>10} {'× SDPA':>7} "
          f"{'× SDPA CPU':>11}")
    for r in rows:
        sp = f"{r['speedup_vs_sdpa']:.1f}" if "speedup_vs_sdpa" in r else ""
        spc = f"{r['cpu_speedup_vs_sdpa']:.1f}" if "cpu_speedup_vs_sdpa" in r else ""
        print(f"{r['form']:8} {r['runtime']:12} {r['n']:>6} {r['ms']:>9.1f} {r['cpu_ms']:>9.1f} "
              f"{r['extra_mib']:>10.0f} {sp:>7} {spc:>11}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "python": platform.python_version(), "heads": a.heads, "dim": a.dim,
                               "threads": 1, "repeats": a.repeats, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
