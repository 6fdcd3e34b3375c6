#!/usr/bin/env python
"""Lowering benchmarks: softmax kernels, attention blocks, a BERT-like encoder.

(a) softmax micro-benchmark, last axis fp32: (8,128,128), (1,16,1024,1024), (4096,4096), one 16M-element row and
    one row of twice the last-level cache; 1 and 2 threads; TVM two-pass / three-pass / rule-table choice vs
    onnxruntime vs torch (``_softmax.out`` into a preallocated tensor), timed in alternating rounds; GB/s against
    the measured copy bandwidth (best of numpy's copy and a parallel TVM copy kernel, at the large row's size).
(b) attention block B=1, H=8, d=64, N in {256, 1024, 4096, 16384}, 2 threads: softmax attention in torch SDPA /
    onnxruntime / TVM vs every catalogue variant in torch / onnxruntime / TVM avx2 / TVM avx512.
(b2) ``--only attnfused``: softmax attention block B=1, H=8, d=64, N in {256, 1024, 4096}, 1 and 2 threads: TVM
    with the fused attention kernel (targets.attention_kernel) vs TVM unfused (score matmul with the scale in its
    epilogue, routed softmax kernel, P·V matmul) vs onnxruntime, per CPU target, timed in alternating rounds.
(c) BERT-like encoder (batch 8, N=128): TVM (untuned) vs onnxruntime.
(d) the real MiniLM, original and linear-attention rewrite, batch 8, N in {128, 512}: torch, onnxruntime, TVM host
    (``--tune TRIALS``: also a tuned build of the original at N = 128, with its tuning time).
(e) ``--only ksplit``: φ(K)ᵀV (H = 8, 64 x 64 per head, K = 4096 / 16384), TVM tiled vs K-split vs numpy vs
    onnxruntime, 1 and 2 threads; and x.sum(-2) of (1, 8, N, 64) with and without the strided-reduction rule
    (tools/bench/lowering_ksplit.py).
(f) ``--only dynamic``: one symbolic-shape artefact vs per-shape static builds, 2 threads, host target: the real
    MiniLM (``--shape input_ids=1..8,1..512``) at batch 1/8 x N = 16/128/512 and the linear attention block at
    N = 1024/4096/16384, each checked against onnxruntime (tools/bench/lowering_dynamic.py).

Every section runs only code this CPU can execute: TVM avx512 columns are left out (and say so) on a host without
AVX-512F, the softmax kernels default to ``--target host``, and every table names the CPU (model, LLVM name, ISA).

Usage: ``TVM_NUM_THREADS=2 .venv/bin/python tools/bench/lowering.py [--quick] [--only softmax,attention,bert,minilm]
[--only attnfused --sizes 1024,4096]
[--tune TRIALS]``.
Prints tables, writes ``tools/bench/results/lowering.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import targets  # noqa: E402,F401
import tvm  # noqa: E402
from targets.bench import ort_session, set_tvm_threads, time_callable, tvm_callable  # noqa: E402
from targets.softmax_kernels import (PREFETCH_FLOATS, KernelChoice, build_kernel_library, choose_kernel,  # noqa: E402
                                     mcpu_of, vector_bits_of)
from targets.cpu import has_avx512, host_description  # noqa: E402
from machine import llc_bytes  # noqa: E402  (tools/bench/machine.py)
from targets.table import ensure_executable, get_target  # noqa: E402
from rewrite.io import quiet_stdout  # noqa: E402

#: TVM CPU targets this host can execute, in the order the tables show them.
CPU_TARGETS = ["avx2"] + (["avx512"] if has_avx512() else [])
CPU = host_description()


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lowering.json")


def _copy_bandwidth(threads: int, n: int) -> float:
    """GB/s of application bytes (one read + one write) copying ``n`` float32: the better of numpy's ``copyto``
    (glibc memcpy, non-temporal stores, one thread) and a parallel 16-lane TVM copy kernel at ``threads``."""
    a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    b = np.empty_like(a)
    t_np = _time_p50(lambda: np.copyto(b, a), 2.0)
    from tvm.script import tirx as T

    @T.prim_func
    def copy(X: T.Buffer((n,), "float32"), Y: T.Buffer((n,), "float32")):
        T.func_attr({"tirx.noalias": True, "global_symbol": "copy"})
        for i in T.parallel(n // 4096):
            for j in range(256):
                for l in T.vectorized(16):
                    Y[i * 4096 + j * 16 + l] = X[i * 4096 + j * 16 + l]

    lib = tvm.compile(tvm.IRModule({"copy": copy}), target=get_target("host"))
    x, y = tvm.runtime.tensor(a), tvm.runtime.tensor(b)
    set_tvm_threads(threads)
    fn = lib["copy"]  # look the function up once: Executable.__getitem__ costs tens of microseconds per call
    t_tvm = _time_p50(lambda: fn(x, y), 2.0)
    return 2 * n * 4 / (min(t_np, t_tvm) * 1e-3) / 1e9


def _time_p50(fn, budget_s: float, rounds: int = 5) -> float:
    """Median ms of ``fn()`` over about ``budget_s`` of runs (at least ``rounds``): :func:`_time_interleaved` of one
    callable."""
    return _time_interleaved({"f": fn}, budget_s, rounds)["f"]


def _time_interleaved(fns: dict, budget_s: float, rounds: int = 5) -> dict:
    """Median ms of each callable, measured in ``rounds`` alternating rounds (A's runs, B's runs, ..., then again)
    so that a slow phase of a shared machine hits every implementation alike; ~``budget_s`` per callable."""
    per_call = {}
    for name, fn in fns.items():
        for _ in range(2):
            fn()
        t = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - t, 1e-6)
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            runs = int(min(1000, max(1, budget_s / rounds / per_call[name])))
            if per_call[name] < 0.05:
                fn()  # re-warm caches after the other implementations ran (not worth it for slow calls)
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) * 1e3 for name, v in samples.items()}


def _softmax_onnx(shape) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "sm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _l3_bytes() -> int:
    """Last-level cache size in bytes, 32 MiB when unknown."""
    return llc_bytes() or (32 << 20)


def bench_softmax(quick: bool, target_name: str) -> list[dict]:
    """(a) Softmax micro-benchmark.  Shapes: the issue's four, plus (not --quick) one row of at least 2x the
    last-level cache (the same as the 16M row on a 32 MiB L3; timed once then).  Implementations: ``two-pass``
    (split over 8-32 chunks for < 4 rows), ``3-pass`` (plain fused three-pass, one row per task), ``auto`` (the
    rule table's choice at that thread count, e.g. the chunked recompute kernel), onnxruntime, torch; all timed in
    alternating rounds per shape and thread count.  GB/s: ``gbs`` counts one read + one write per element
    (2*N*4 bytes); ``eff_gbs`` (rows larger than the last-level cache only) counts the bytes the algorithm must
    move: two-pass and recompute 2 reads + 1 write, three-pass 3 reads + 2 writes, blocked three-pass 2 + 2."""
    ensure_executable(target_name)
    l3 = _l3_bytes()
    beyond = 1 << max(24, int(np.ceil(np.log2(2 * l3 / 4))))  # elements, >= 2x L3 bytes
    shapes = [(8, 128, 128), (1, 16, 1024, 1024), (4096, 4096), (1, 1 << 24)] + ([(1, beyond)] if beyond > 1 << 24
                                                                              else [])
    if quick:
        shapes = [(8, 128, 128), (1, 1 << 20)]
    tgt = get_target(target_name)
    bits = vector_bits_of(tgt)
    lanes = bits // 32
    rows_out = []
    copy_n = max(1 << 24, beyond if not quick else 1 << 24)
    copy_bw = {t: _copy_bandwidth(t, copy_n) for t in (1, 2)}
    print(f"\n(a) softmax on {CPU}, target {target_name} = {tgt} ({bits}-bit); L3 {l3 >> 20} MiB; copy bandwidth ({copy_n * 4 >> 20} "
          f"MiB) 1T {copy_bw[1]:.1f} GB/s, 2T {copy_bw[2]:.1f} GB/s (GB/s = 2*N*4 bytes / time; eff = bytes the "
          f"algorithm must move: two-pass and recompute 2R+1W, three-pass 3R+2W, blocked three-pass 2R+2W)")
    print(f"{'shape':>20} {'T':>2} {'impl':>10} {'ms':>9} {'GB/s':>6} {'eff':>6} {'%copy':>6} {'vs ORT':>7}")
    budget_s = 0.1 if quick else 0.6
    for shape in shapes:
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        x = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32) * 4
        nbytes = 2 * rows * cols * 4
        out_of_cache = rows * cols * 4 > l3
        chunks = _pick_split_chunks(cols) if rows < 4 else 1
        layout = "split" if chunks > 1 else "fused"
        fixed = {
            "two-pass": KernelChoice("two_pass", layout, lanes, 4, chunks, scalef=lanes == 16,
                                     prefetch=PREFETCH_FLOATS if cols >= (1 << 18) else 0),
            "3-pass": KernelChoice("three_pass", "fused", lanes, 4, 1, min(rows, 64)),
        }
        libs = {name: build_kernel_library(rows, cols, ch, tgt) for name, ch in fixed.items()}
        xt, yt = tvm.runtime.tensor(x), tvm.runtime.tensor(np.empty_like(x))
        tx, ty = torch.from_numpy(x), torch.empty(rows, cols)
        for threads in (1, 2):
            auto = choose_kernel(rows, cols, bits, threads, mcpu_of(tgt))
            same = [name for name, ch in fixed.items() if ch == auto]
            rule_lib = libs[same[0]] if same else build_kernel_library(rows, cols, auto, tgt)
            set_tvm_threads(threads)
            torch.set_num_threads(threads)
            sess = ort_session(_softmax_onnx((rows, cols)), threads)
            # functions looked up once: Executable.__getitem__ alone costs ~40 us, as much as the whole in-cache
            # softmax
            kernels = {name: lib["softmax"] for name, lib in libs.items()}
            if not same:
                kernels["rule"] = rule_lib["softmax"]
            fns = {name: (lambda k=k: k(xt, yt)) for name, k in kernels.items()}
            fns["ORT"] = lambda: sess.run(None, {"x": x})
            fns["torch"] = lambda: torch.ops.aten._softmax.out(tx, -1, False, out=ty)
            res = _time_interleaved(fns, budget_s)
            res["auto"] = res.pop(same[0] if same else "rule")
            if same:
                res[same[0]] = res["auto"]
            del sess
            for name, ms in res.items():
                gbs = nbytes / (ms * 1e-3) / 1e9
                algo = auto.algo if name == "auto" else fixed[name].algo if name in fixed else None
                blocked = name == "auto" and auto.algo == "three_pass" and auto.layout == "split"
                moved = {"two_pass": 1.5, "recompute": 1.5, "three_pass": 2.0 if blocked else 2.5}.get(algo)
                eff = gbs * moved if (moved and out_of_cache) else None
                row = {"shape": list(shape), "threads": threads, "impl": name, "ms": ms, "gbs": gbs,
                       "eff_gbs": eff, "pct_copy": 100 * (eff or gbs) / copy_bw[threads],
                       "speedup_vs_ort": res["ORT"] / ms, "out_of_cache": out_of_cache,
                       "auto_choice": (f"{auto.algo}/{auto.layout}" + (f"/{auto.chunks}" if auto.layout == "split"
                                                                        else "")) if name == "auto" else None}
                rows_out.append(row)
                eff_txt = f"{eff:6.1f}" if eff else "     -"
                print(f"{str(shape):>20} {threads:>2} {name:>10} {ms:9.3f} {gbs:6.1f} {eff_txt} "
                      f"{row['pct_copy']:6.0f} {row['speedup_vs_ort']:7.2f}" +
                      (f"  ({row['auto_choice']})" if name == "auto" else ""))
        del xt, yt, tx, ty, x
    set_tvm_threads(2)
    return rows_out + [{"copy_bandwidth_gbs": copy_bw, "copy_elements": copy_n, "l3_bytes": l3}]


def _pick_split_chunks(cols: int) -> int:
    return 32 if cols >= (1 << 22) else 8


class _SoftmaxAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _VariantAttention(torch.nn.Module):
    """One catalogue variant (passes.attention.VARIANTS), non-causal, no mask, default options."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, q, k, v):
        from passes.attention import VARIANTS

        return VARIANTS[self.name].fn(q, k, v, scale=q.shape[-1] ** -0.5, causal=False, key_padding=None)


def _onnx_of(module, args, names) -> onnx.ModelProto:
    with quiet_stdout():
        return torch.onnx.export(module.eval(), args, dynamo=True, input_names=names, verbose=False).model_proto


# live fp32 score-sized (H*N*N) tensors at peak, per implementation (for skipping what does not fit in memory)
_SCORE_TENSORS = {"softmax": 2, "sigmoid": 4, "softplus": 6}


def bench_attention(quick: bool, max_gb: float = 18.0, sizes: list[int] | None = None,
                    variants: list[str] | None = None) -> list[dict]:
    """(b) Attention block B=1, H=8, d=64, N in {256, 1024, 4096, 16384}, 2 threads: softmax (torch SDPA, onnxruntime,
    TVM avx512) vs every catalogue variant (onnxruntime, TVM avx2, TVM avx512).  ONNX from exporting each function at
    the size; TVM compiles that graph with static shapes.  Combinations whose score tensors need more than ``max_gb``
    are skipped with the reason."""
    from passes.attention import VARIANTS

    ns = sizes or ([256] if quick else [256, 1024, 4096, 16384])
    heads, dim = 8, 64
    names = [n for n in VARIANTS if n != "reference" and (not variants or n in variants)]
    out = []
    threads = 2
    set_tvm_threads(threads)
    torch.set_num_threads(threads)
    print(f"\n(b) attention B=1 H={heads} d={dim} on {CPU}, {threads} threads, ms (p50); ratio = variant / softmax "
          "on the same runtime" + ("" if has_avx512() else "; no TVM avx512 column: this CPU has no AVX-512F"))
    print(f"{'variant':>9} {'N':>6} {'runtime':>12} {'ms':>10} {'vs softmax':>10}")
    for n in ns:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
        feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
        budget = 1.0 if quick else 3.0
        base: dict = {}

        def record(variant, runtime, ms=None, skip=None):
            ratio = ms / base[runtime] if ms is not None and base.get(runtime) else None
            out.append({"variant": variant, "N": n, "runtime": runtime, "ms": ms, "skip": skip,
                        "vs_softmax": ratio, "threads": threads})
            shown = f"{ms:10.2f}" if ms is not None else f"{'skip':>10}"
            extra = f"{ratio:9.3f}x" if ratio else (f"  ({skip})" if skip else "")
            print(f"{variant:>9} {n:>6} {runtime:>12} {shown} {extra}", flush=True)
            if variant == "softmax" and ms is not None:
                base[runtime] = ms

        with torch.inference_mode():
            sdpa_ms = _time_p50(lambda: F.scaled_dot_product_attention(q, k, v), budget, rounds=3)
        record("softmax", "torch", sdpa_ms)
        for name in ["softmax"] + names:
            gb = _SCORE_TENSORS.get(name, 0) * heads * n * n * 4 / 1e9
            tvm_rts = [f"TVM {t}" for t in CPU_TARGETS]
            runtimes = (["ORT"] if name == "softmax" else ["torch", "ORT"]) + tvm_rts
            if name == "softmax" and gb > 8 and len(tvm_rts) > 1:  # one TVM build of a 17 GB graph is enough
                runtimes.remove("TVM avx2")
                record(name, "TVM avx2", skip="only avx512 above 8 GB of scores")
            if gb > max_gb:
                for rt in runtimes:
                    record(name, rt, skip=f"~{gb:.0f} GB of scores")
                continue
            if name != "softmax":
                mod = _VariantAttention(name)
                with torch.inference_mode():
                    record(name, "torch", _time_p50(lambda: mod(q, k, v), budget, rounds=3))
            model = _onnx_of(_SoftmaxAttention() if name == "softmax" else _VariantAttention(name), (q, k, v),
                             ["q", "k", "v"])
            sess = ort_session(model, threads)
            record(name, "ORT", _time_p50(lambda: sess.run(None, feeds), budget, rounds=3))
            del sess
            gc.collect()
            for rt in runtimes:
                if not rt.startswith("TVM"):
                    continue
                try:
                    fn = tvm_callable(model, rt.split()[1], feeds)
                except Exception as exc:  # noqa: BLE001 - a lowering failure is a result of the benchmark
                    record(name, rt, skip=f"{type(exc).__name__}: {str(exc)[:80]}")
                    continue
                record(name, rt, _time_p50(fn, budget, rounds=3))
                del fn
                gc.collect()  # the VM's pooled allocator holds its storage until the VM is gone
    return out


def _tvm_vm_call(model, target: str, feeds: dict, fused: bool):
    """Compile ``model`` (ONNX) for ``target`` with the CPU pipeline, fused attention on or off; return a callable
    running it on ``feeds`` and returning the output as numpy."""
    from tvm import relax

    from targets.importer import import_model
    from targets.pipeline import cpu_pipeline

    ensure_executable(target)
    imp = import_model(model)
    tgt = get_target(target)
    ex = tvm.compile(imp.mod, target=tgt, relax_pipeline=cpu_pipeline(tgt, route_attention=fused))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[i["name"]])) for i in imp.inputs]
    f = vm["main"]

    def result():
        out = f(*args)
        return (out if hasattr(out, "numpy") else out[0]).numpy()

    return (lambda: f(*args)), result


def bench_attention_fused(quick: bool, sizes: list[int] | None = None) -> list[dict]:
    """(b2) Softmax attention B=1, H=8, d=64 (SDPA exported by the dynamo ONNX exporter), 1 and 2 threads: TVM fused
    kernel vs TVM unfused vs onnxruntime on every CPU target this host executes, interleaved rounds; ``vs ORT`` =
    ORT ms / impl ms (> 1: faster than onnxruntime)."""
    ns = sizes or ([256] if quick else [256, 1024, 4096])
    heads, dim = 8, 64
    out = []
    print(f"\n(b2) softmax attention B=1 H={heads} d={dim} on {CPU}: fused kernel vs unfused vs onnxruntime, ms (p50)"
          + ("" if has_avx512() else "; no avx512 rows: this CPU has no AVX-512F"))
    print(f"{'N':>6} {'T':>2} {'impl':>20} {'ms':>10} {'vs ORT':>7} {'max err':>9}")
    for n in ns:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
        feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
        model = _onnx_of(_SoftmaxAttention(), (q, k, v), ["q", "k", "v"])
        tvm_fns = {}
        for t in CPU_TARGETS:
            for fused in (True, False):
                tvm_fns[f"TVM {t} {'fused' if fused else 'unfused'}"] = _tvm_vm_call(model, t, feeds, fused)
        for threads in (2, 1):  # the TVM pool can be lowered at run time, not raised
            set_tvm_threads(threads)
            sess = ort_session(model, threads)
            ref = sess.run(None, feeds)[0]
            fns = {"ORT": lambda: sess.run(None, feeds)}
            fns.update({name: pair[0] for name, pair in tvm_fns.items()})
            errs = {name: float(np.abs(pair[1]() - ref).max()) for name, pair in tvm_fns.items()}
            budget = 1.0 if quick else (3.0 if n <= 1024 else 6.0)
            res = _time_interleaved(fns, budget, rounds=3 if n >= 4096 else 5)
            for name, ms in res.items():
                row = {"N": n, "threads": threads, "impl": name, "ms": ms, "speedup_vs_ort": res["ORT"] / ms,
                       "max_err_vs_ort": errs.get(name, 0.0)}
                out.append(row)
                print(f"{n:>6} {threads:>2} {name:>20} {ms:10.2f} {row['speedup_vs_ort']:7.2f} "
                      f"{row['max_err_vs_ort']:9.1e}", flush=True)
            del sess
        del tvm_fns
        gc.collect()
    return out


class _BertLayer(torch.nn.Module):
    def __init__(self, d=256, h=4, ff=1024):
        super().__init__()
        self.h = h
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.f1, self.f2 = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = self.ln1(x + self.o(a))
        return self.ln2(x + self.f2(F.gelu(self.f1(x))))


def bench_bert(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_BertLayer() for _ in range(2 if quick else 4)]).eval()
    x = torch.randn(8, 128, 256)
    proto = _onnx_of(model, (x,), ["x"])
    feeds = {"x": x.numpy()}
    out = []
    print(f"\n(c) BERT-like encoder (d=256, 4 heads, ff 1024), batch 8, N=128, ms (p50), on {CPU}")
    t0 = time.perf_counter()
    fns = {t: tvm_callable(proto, t, feeds) for t in CPU_TARGETS}
    print(f"   TVM compile ({len(fns)} targets): {time.perf_counter() - t0:.1f} s")
    for threads in (1, 2):
        set_tvm_threads(threads)
        s = ort_session(proto, threads)
        ort_ms = time_callable(lambda: s.run(None, feeds), 10, 3)["p50"]
        torch.set_num_threads(threads)
        with torch.inference_mode():
            torch_ms = time_callable(lambda: model(x), 10, 3)["p50"]
        rows = [("ORT", ort_ms), ("torch", torch_ms)] + [(f"TVM {t}", time_callable(f, 10, 3)["p50"])
                                                         for t, f in fns.items()]
        for impl, ms in rows:
            out.append({"threads": threads, "impl": impl, "ms": ms, "vs_ort": ms / ort_ms})
            print(f"   {threads}T {impl:>12} {ms:9.3f} ms  ({ms / ort_ms:.2f}x ORT time)")
    set_tvm_threads(2)
    return out


def bench_minilm(quick: bool, tune_trials: int = 0) -> list[dict]:
    """(d) The real all-MiniLM-L6-v2, original and rewritten (linear attention), batch 8, N in {128, 512}:
    torch (eager HF module / rewritten FX program), onnxruntime and TVM for this host (untuned), 2 threads; with
    ``tune_trials`` also TVM host tuned (MetaSchedule, fresh database) on the original at N = 128, with the tuning
    time."""
    import tempfile

    import rewrite
    from rewrite.hf import minilm_path
    from rewrite.io import load_model
    from targets import Runner, compile_model

    loaded = load_model(minilm_path())
    hf = loaded.extra["hf"]
    out: list[dict] = []
    print(f"\n(d) real MiniLM (6 layers, 12 heads), batch 8, ms (p50), 2 threads, on {CPU}; TVM target host = "
          f"{get_target('host')}")
    with tempfile.TemporaryDirectory() as tmp:
        original = os.path.join(tmp, "minilm.onnx")
        rewrite.export(loaded, original)
        linear_model, _ = rewrite.convert(loaded, os.path.join(tmp, "minilm_linear.onnx"), attention="linear",
                                          verify=False)
        models = {"softmax": (original, hf.module), "linear": (os.path.join(tmp, "minilm_linear.onnx"),
                                                                linear_model.ep.module())}
        set_tvm_threads(2)
        torch.set_num_threads(2)
        for n in ((128,) if quick else (128, 512)):
            inputs = hf.make_inputs(8, n)
            feeds = {k: v.numpy() for k, v in inputs.items()}
            for label, (path, module) in models.items():
                sess = ort_session(path, 2)
                lib = os.path.join(tmp, f"{label}_{n}.so")
                shapes = {k: list(v.shape) for k, v in feeds.items()}
                t0 = time.perf_counter()
                compile_model(path, "host", lib, shapes=shapes)
                compile_s = time.perf_counter() - t0
                runner = Runner(lib)
                fns = {"torch": lambda: module(**inputs), "ORT": lambda: sess.run(None, feeds),
                       "TVM host": lambda: runner.run(feeds)}
                extra_s = {"TVM host": compile_s}
                if tune_trials and label == "softmax" and n == 128:
                    tuned_lib = os.path.join(tmp, f"{label}_{n}_tuned.so")
                    meta = compile_model(path, "host", tuned_lib, shapes=shapes, tune_trials=tune_trials,
                                         tuning_dir=os.path.join(tmp, "tuning"))
                    tuned = Runner(tuned_lib)
                    fns[f"TVM tuned {tune_trials}"] = lambda: tuned.run(feeds)
                    extra_s[f"TVM tuned {tune_trials}"] = meta["tuning"]["seconds"]
                    out.append({"model": label, "N": n, "tuning": meta["tuning"]})
                    print(f"   tuning: {meta['tuning']['seconds']:.0f} s for {tune_trials} trials; tasks: "
                          + "; ".join(f"{t['task']}: tuned {t['tuned_ms']:.3f} ms vs rule {t['rule_ms']:.3f} ms"
                                      for t in meta["tuning"].get("tasks", [])))
                with torch.inference_mode():
                    res = _time_interleaved(fns, 1.0 if quick else 4.0)
                for impl, ms in res.items():
                    out.append({"model": label, "N": n, "impl": impl, "ms": ms, "vs_ort": ms / res["ORT"],
                                "compile_or_tuning_s": extra_s.get(impl)})
                    print(f"   {label:>7} N={n:4d} {impl:>15} {ms:9.2f} ms  ({ms / res['ORT']:.2f}x ORT time)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--only", default="softmax,attention,bert,minilm",
                    help="comma list of sections (also: ksplit, attnfused, dynamic)")
    ap.add_argument("--target", default="host",
                    help="target of the softmax kernels (default host: the best code this CPU executes)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--sizes", default="",
                    help="(b), (b2): comma list of N (default 256,1024,4096,16384; (b2) 256,1024,4096)")
    ap.add_argument("--variants", default="", help="(b): comma list of variants besides softmax (default all)")
    ap.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                    help="(d): also tune the original MiniLM at N=128 with this many MetaSchedule trials")
    args = ap.parse_args(argv)
    sections = set(args.only.split(","))
    result = {"machine": CPU, "cpu_targets": CPU_TARGETS, "host_target": str(get_target("host")),
              "tvm_threads": os.environ["TVM_NUM_THREADS"], "quick": args.quick}
    if "softmax" in sections:
        result["softmax"] = bench_softmax(args.quick, args.target)
    if "attention" in sections:
        result["attention"] = bench_attention(args.quick, sizes=[int(n) for n in args.sizes.split(",") if n],
                                              variants=[v for v in args.variants.split(",") if v])
    if "attnfused" in sections:
        result["attention_fused"] = bench_attention_fused(args.quick, [int(n) for n in args.sizes.split(",") if n])
    if "bert" in sections:
        result["bert"] = bench_bert(args.quick)
    if "minilm" in sections:
        result["minilm"] = bench_minilm(args.quick, args.tune)
    if "ksplit" in sections:  # (e) tools/bench/lowering_ksplit.py
        from lowering_ksplit import bench_ksplit, bench_strided_reduction
        result["ksplit"] = bench_ksplit(args.quick, _time_interleaved)
        result["strided_reduction"] = bench_strided_reduction(args.quick, _time_interleaved)
    if "dynamic" in sections:  # (f) tools/bench/lowering_dynamic.py
        from lowering_dynamic import bench_dynamic
        print(f"\n(f) one dynamic artefact vs per-shape static builds on {CPU}, host target, "
              f"{os.environ['TVM_NUM_THREADS']} threads, ms (p50, alternating rounds)")
        result["dynamic"] = bench_dynamic(args.quick, _time_interleaved, int(os.environ["TVM_NUM_THREADS"]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
