#!/usr/bin/env python
"""BiViT kernel benchmark: a ViT-Base-sized binary linear (768 -> 3072, 197 tokens, batch 1) on the 1-bit kernel.

Rows (the same input, every TVM build through the project's CPU pipeline, on the best target this host runs):

* ``tvm 1-bit``: the contract's frozen binary linear ``(where(x >= 0, 1, -1) @ W±1) * α + b``, routed to the
  bit-packed XNOR/popcount kernels (``targets.bitlinear``); its two kernels (run-time packing of the activations,
  the product) are also timed alone;
* ``tvm float``: the float linear ``x @ W + b`` with float32 weights (what the binary linear replaces);
* ``tvm ±1 as float``: the binary graph with the routing switched off (TVM's float matmul on ±1 weights);
* ``ort float`` / ``ort ±1 as float``: the same two graphs in onnxruntime (MLAS sgemm).

Times are medians over alternating rounds (every implementation runs in each round, so a slow phase of a shared
machine hits them alike), at 1 and 2 threads.  The 1-bit output is checked against onnxruntime on the binary graph
before timing.

Usage: ``TVM_NUM_THREADS=2 .venv/bin/python tools/bench/bivit_kernel.py [--budget SECONDS] [--threads 1,2]
[--also avx2]``.  Prints a table, writes ``tools/bench/results/bivit_kernel.json``.  From another bench:
``measure(...)`` returns the results, ``table_lines(results)`` the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))
sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import targets  # noqa: E402,F401
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from machine import describe  # noqa: E402  (tools/bench/machine.py)
from targets.bench import ort_session, set_tvm_threads  # noqa: E402
from targets.bitlinear import (choose_bit_kernel, make_bgemm_kernel, make_pack_kernel, pack_weights,  # noqa: E402
                               padded_outputs, words_of)
from targets.cpu import required_features  # noqa: E402
from targets.importer import import_onnx  # noqa: E402
from targets.pipeline import cpu_pipeline, scheduled_module  # noqa: E402
from targets.softmax_kernels import mcpu_of, vector_bits_of  # noqa: E402
from targets.table import ensure_executable, get_target, missing_on_host  # noqa: E402

RESULTS = os.path.join(_HERE, "results", "bivit_kernel.json")


def _linear_onnx(tokens: int, n_in: int, n_out: int, binary: bool, seed: int = 0) -> onnx.ModelProto:
    """``x (1, tokens, n_in) -> y (1, tokens, n_out)``: the binary linear of the contract, or the float linear."""
    rng = np.random.default_rng(seed)
    bias = numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32) * 0.1, "b")
    if binary:
        w = np.where(rng.random((n_in, n_out)) < 0.5, 1.0, -1.0).astype(np.float32)
        inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                 numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                 numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one"),
                 numpy_helper.from_array(w, "w"),
                 numpy_helper.from_array((rng.random(n_out) * 0.05).astype(np.float32), "alpha"), bias]
        nodes = [helper.make_node("GreaterOrEqual", ["x", "zero"], ["c"]),
                 helper.make_node("Where", ["c", "one", "minus_one"], ["s"]),
                 helper.make_node("MatMul", ["s", "w"], ["mm"]),
                 helper.make_node("Mul", ["mm", "alpha"], ["sc"]),
                 helper.make_node("Add", ["sc", "b"], ["y"])]
    else:
        w = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        inits = [numpy_helper.from_array(w, "w"), bias]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    g = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, n_out])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _isa(target) -> str:
    feats = set(required_features(target))
    return ("AVX-512 + VPOPCNTDQ" if "avx512vpopcntdq" in feats else "AVX-512" if "avx512f" in feats
            else "AVX2" if "avx2" in feats else "SSE")


def _tvm_fn(proto: onnx.ModelProto, target, x: np.ndarray, route: bool):
    mod = import_onnx(proto).mod
    ex = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target, route_bitlinear=route))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    f, arg = vm["main"], tvm.runtime.tensor(x)
    return lambda: f(arg)


def _kernel_fns(tokens: int, n_in: int, n_out: int, target, x: np.ndarray, w: np.ndarray) -> dict:
    bits = vector_bits_of(target)
    ch = choose_bit_kernel(tokens, n_out, bits)
    mod = tvm.IRModule({"pack": make_pack_kernel(tokens, n_in, bits).with_attr("global_symbol", "pack"),
                        "bgemm": make_bgemm_kernel(tokens, n_in, n_out, ch).with_attr("global_symbol", "bgemm")})
    lib = tvm.compile(mod, target=target)
    xt = tvm.runtime.tensor(x.reshape(tokens, n_in))
    xp = tvm.runtime.tensor(np.zeros((tokens, words_of(n_in)), np.uint64))
    wp = tvm.runtime.tensor(pack_weights(w, ch.panel))
    y = tvm.runtime.tensor(np.zeros((tokens, padded_outputs(n_out, ch)), np.float32))
    pack, gemm = lib["pack"], lib["bgemm"]
    asm = lib.mod.inspect_source("asm")
    return {"pack": lambda: pack(xt, xp), "bgemm": lambda: gemm(xp, wp, y)}, ch, "vpopcntq" in asm


def _time_interleaved(fns: dict, budget_s: float, rounds: int) -> dict:
    """Median ms of each callable over ``rounds`` alternating rounds of about ``budget_s / rounds`` each."""
    per_call = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        t = time.perf_counter()
        fn()
        per_call[name] = max(time.perf_counter() - t, 1e-6)
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()  # re-warm caches after the others ran
            for _ in range(int(min(2000, max(3, budget_s / rounds / per_call[name])))):
                t = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t)
    return {name: {"median_ms": float(np.median(v)) * 1e3, "min_ms": float(np.min(v)) * 1e3, "runs": len(v)}
            for name, v in samples.items()}


class BenchError(RuntimeError):
    """The 1-bit build was not routed, or its output disagrees with onnxruntime (nothing is timed then)."""


def measure(tokens: int = 197, n_in: int = 768, n_out: int = 3072, threads: tuple[int, ...] = (1, 2),
            budget_s: float = 2.0, rounds: int = 5, also: tuple[str, ...] = ("avx2",)) -> dict:
    """Time the rows of the module docstring; returns the result dict (also what the JSON holds): ``rows[threads]
    [implementation] = {median_ms, min_ms, runs}``, ``speedup_vs_tvm_float[threads][target]``, the CPU, the target
    and its ISA, the kernel's tile.  ``also``: extra targets timed where this CPU runs them.  Raises BenchError."""
    target = get_target("host")  # this CPU's own model, every ISA feature it lacks switched off: the best it runs
    ensure_executable(target)
    t, k, n = tokens, n_in, n_out
    x = np.random.default_rng(1).standard_normal((1, t, k)).astype(np.float32)
    binary, floating = _linear_onnx(t, k, n, True), _linear_onnx(t, k, n, False)
    w = numpy_helper.to_array(next(i for i in binary.graph.initializer if i.name == "w"))
    ref = ort_session(binary, 1).run(None, {"x": x})[0]

    fns: dict = {}
    extra = [name.strip() for name in also if name.strip() and not missing_on_host(name.strip())]
    for label, tgt in [("", target)] + [(f" [{name}]", get_target(name)) for name in extra]:
        routed = [gv.name_hint for gv, _ in scheduled_module(import_onnx(binary).mod, tgt).functions_items()
                  if gv.name_hint.startswith("bitlinear_gemm")]
        if not routed:
            raise BenchError(f"the binary linear was not routed to the 1-bit kernel for {tgt}")
        f1 = _tvm_fn(binary, tgt, x, route=True)
        err = float(np.abs(f1().numpy() - ref).max())
        if err > 1e-4:
            raise BenchError(f"1-bit output differs from onnxruntime by {err} for {tgt}")
        kfns, ch_t, vpop_t = _kernel_fns(t, k, n, tgt, x, w)
        if not label:
            ch, vpopcnt, max_err = ch_t, vpop_t, err
        fns[f"tvm 1-bit{label}"] = f1
        fns[f"  pack alone{label}"] = kfns["pack"]
        fns[f"  bgemm alone{label}"] = kfns["bgemm"]
        fns[f"tvm float{label}"] = _tvm_fn(floating, tgt, x, route=True)
        if not label:
            fns["tvm ±1 as float"] = _tvm_fn(binary, tgt, x, route=False)
    results: dict = {"cpu": describe(), "target": str(target), "mcpu": mcpu_of(target), "isa": _isa(target),
                     "also": extra, "vpopcntq_emitted": vpopcnt,
                     "shape": {"tokens": t, "n_in": k, "n_out": n, "batch": 1},
                     "kernel_choice": ch.__dict__, "max_abs_err_vs_ort": max_err,
                     "order": list(fns) + ["ort float", "ort ±1 as float"], "rows": {}}
    for th in threads:
        set_tvm_threads(th)
        sessions = {"ort float": ort_session(floating, th), "ort ±1 as float": ort_session(binary, th)}
        all_fns = dict(fns)
        for name, sess in sessions.items():
            all_fns[name] = (lambda s=sess: s.run(None, {"x": x}))
        results["rows"][th] = _time_interleaved(all_fns, budget_s, rounds)
        for label in [""] + [f" [{name}]" for name in extra]:
            one_bit = results["rows"][th][f"tvm 1-bit{label}"]["median_ms"]
            key = label.strip(" []") or "host"
            results.setdefault("speedup_vs_tvm_float", {}).setdefault(th, {})[key] = \
                results["rows"][th][f"tvm float{label}"]["median_ms"] / one_bit
            results.setdefault("speedup_vs_ort_float", {}).setdefault(th, {})[key] = \
                results["rows"][th]["ort float"]["median_ms"] / one_bit
    return results


def table_lines(results: dict) -> list[str]:
    """The printed table of :func:`measure`'s results (CPU and target named in the header)."""
    threads = list(results["rows"])
    ch = results["kernel_choice"]
    shape = results["shape"]
    lines = [f"# BiViT binary linear {shape['n_in']} -> {shape['n_out']}, {shape['tokens']} tokens, batch 1 - "
             f"{results['cpu']}",
             f"# TVM target: {results['target']} ({results['isa']}; vpopcntq "
             f"{'emitted' if results['vpopcntq_emitted'] else 'not emitted'}); kernel tile {ch['rows']} rows x "
             f"{ch['lanes'] * ch['vectors']} outputs, {ch['lanes']} x uint64 lanes"
             + (f"; also {', '.join(results['also'])}" if results["also"] else ""),
             "# shared 2-core machine: medians of alternating rounds, still noisy"]
    head = f"{'implementation':<28}" + "".join(f"{f'{th} thr ms':>12}{'/ 1-bit':>10}" for th in threads)
    lines += [head, "-" * len(head)]
    for name in results["order"]:
        line = f"{name:<28}"
        for th in threads:
            ms = results["rows"][th][name]["median_ms"]
            label = name[name.index(" ["):] if " [" in name else ""
            base = results["rows"][th][f"tvm 1-bit{label}"]["median_ms"]
            ratio = "" if name.startswith(" ") else f"{ms / base:.1f}x"
            line += f"{ms:>12.3f}{ratio:>10}"
        lines.append(line)
    lines.append("goal (>= 4x faster than the float linear in TVM): " + ", ".join(
        f"{th} thr {tgt} {v:.1f}x" for th, d in results["speedup_vs_tvm_float"].items() for tgt, v in d.items()))
    return lines


def _encoder_layer(binary: bool, dim: int, heads: int, mlp: int, seed: int = 0):
    """A ViT encoder layer (pre-norm, softmax attention, GELU MLP) whose six linears are either float or the
    contract's frozen binary linears (``where(x >= 0, 1, -1)`` -> ``linear(·, W±1) * α + b``); attention stays float.
    """
    import torch
    import torch.nn.functional as F

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
            for name, (n_in, n_out) in {"q": (dim, dim), "k": (dim, dim), "v": (dim, dim), "o": (dim, dim),
                                        "fc1": (dim, mlp), "fc2": (mlp, dim)}.items():
                w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
                self.register_buffer(f"{name}_w", torch.where(w >= 0, 1.0, -1.0) if binary else w)
                self.register_buffer(f"{name}_a", w.abs().mean(1))
                self.register_buffer(f"{name}_b", torch.randn(n_out, generator=g) * 0.02)

        def lin(self, name, x):
            w, a, b = (getattr(self, f"{name}_{p}") for p in "wab")
            if binary:
                return F.linear(torch.where(x >= 0, 1.0, -1.0), w) * a + b
            return F.linear(x, w, b)

        def forward(self, x):
            bsz, t, _ = x.shape
            h = self.ln1(x)
            q, k, v = (self.lin(n, h).view(bsz, t, heads, dim // heads).transpose(1, 2) for n in "qkv")
            p = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1)
            x = x + self.lin("o", (p @ v).transpose(1, 2).reshape(bsz, t, dim))
            return x + self.lin("fc2", F.gelu(self.lin("fc1", self.ln2(x))))

    return Layer().eval()


def measure_layer(tokens: int = 197, dim: int = 768, heads: int = 12, mlp: int = 3072,
                  threads: tuple[int, ...] = (1,), budget_s: float = 2.0, rounds: int = 5) -> dict:
    """A ViT-Base encoder layer (batch 1) with float vs binary linears, in TVM (``host``, project pipeline) and
    onnxruntime; ``rows[threads][implementation] = {median_ms, ...}``, ``routed`` = binary linears on the kernel."""
    import logging

    import torch

    from rewrite.io import quiet_stdout

    target = get_target("host")
    x = np.random.default_rng(2).standard_normal((1, tokens, dim)).astype(np.float32)
    fns: dict = {}
    sessions: dict = {}
    routed = 0
    for kind in ("float", "binary"):
        model = _encoder_layer(kind == "binary", dim, heads, mlp)
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with quiet_stdout():
            proto = torch.onnx.export(model, (torch.from_numpy(x),), dynamo=True, input_names=["x"],
                                      verbose=False).model_proto
        sessions[f"ort {kind} layer"] = proto
        # TVM compiles the same ONNX graph onnxruntime runs
        mod = import_onnx(proto).mod
        if kind == "binary":
            routed = sum(gv.name_hint.startswith("bitlinear_gemm") for gv, _ in
                         scheduled_module(mod, target).functions_items())
        vm = relax.VirtualMachine(tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target)), tvm.cpu())
        f, arg = vm["main"], tvm.runtime.tensor(x)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        out = f(arg)
        out = (out if hasattr(out, "numpy") else out[0]).numpy()
        err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6))
        if err > 1e-3:
            raise BenchError(f"TVM {kind} layer differs from torch by {err} (relative to max |y|)")
        fns[f"tvm {kind} layer"] = (lambda f=f, arg=arg: f(arg))
    results: dict = {"cpu": describe(), "target": str(target), "shape": {"tokens": tokens, "dim": dim,
                                                                          "heads": heads, "mlp": mlp},
                     "routed_binary_linears": routed, "rows": {}}
    for th in threads:
        set_tvm_threads(th)
        all_fns = dict(fns)
        for name, proto in sessions.items():
            sess = ort_session(proto, th)
            all_fns[name] = (lambda s=sess: s.run(None, {"x": x}))
        results["rows"][th] = _time_interleaved(all_fns, budget_s, rounds)
    return results


def layer_lines(results: dict) -> list[str]:
    """The printed table of :func:`measure_layer`."""
    sh = results["shape"]
    lines = [f"# ViT encoder layer ({sh['tokens']} tokens, dim {sh['dim']}, {sh['heads']} heads, MLP {sh['mlp']}), "
             f"batch 1 - {results['cpu']}; {results['routed_binary_linears']} distinct binary linear shapes routed "
             "(attention stays float)"]
    threads = list(results["rows"])
    head = f"{'implementation':<28}" + "".join(f"{f'{th} thr ms':>12}{'/ tvm bin':>10}" for th in threads)
    lines += [head, "-" * len(head)]
    for name in ("tvm binary layer", "tvm float layer", "ort binary layer", "ort float layer"):
        line = f"{name:<28}"
        for th in threads:
            ms = results["rows"][th][name]["median_ms"]
            line += f"{ms:>12.3f}{ms / results['rows'][th]['tvm binary layer']['median_ms']:>9.1f}x"
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--n-in", type=int, default=768)
    ap.add_argument("--n-out", type=int, default=3072)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per implementation and thread count")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--also", default="avx2", help="comma-separated extra targets to time (those this CPU runs)")
    ap.add_argument("--layer", action="store_true", help="also time a whole ViT-Base encoder layer, float vs binary")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    try:
        results = measure(args.tokens, args.n_in, args.n_out,
                          tuple(int(v) for v in args.threads.split(",") if v.strip()), args.budget, args.rounds,
                          tuple(args.also.split(",")))
    except BenchError as exc:
        print(f"bivit_kernel: {exc}", file=sys.stderr)
        return 1
    print("\n".join(table_lines(results)))
    if args.layer:
        try:
            results["layer"] = measure_layer(args.tokens, args.n_in, 12, args.n_out, (1,), args.budget, args.rounds)
        except BenchError as exc:
            print(f"bivit_kernel: {exc}", file=sys.stderr)
            return 1
        print("\n".join(layer_lines(results["layer"])))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
