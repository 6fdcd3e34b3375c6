"""Per-kernel time of one dynamic (symbolic-shape) artefact vs the static build of one shape (issue #14).

Where :mod:`lowering_dynamic` times whole models, this splits the time by the VM's calls: a VM instrument hook
(``VirtualMachine.set_instrument``) records the wall time of every call (compiled kernels and VM builtins such as
``vm.builtin.make_shape``); calls are grouped by their symbol with trailing digits removed (``fused_matmul1_add5``
-> ``fused_matmul_add``... keeps the op names, drops TVM's numbering), the static and dynamic runs alternate.
Run it at 1 thread (``TVM_NUM_THREADS=1``): with more the time of a kernel includes its thread-pool launch.

Usage (the host's ``host`` target; artefacts are cached under ``--cache`` in a folder keyed by the source of
``targets/`` and ``rewrite/``, so a change to either builds them anew)::

    TVM_NUM_THREADS=1 python tools/bench/dynamic_profile.py minilm 1 512
    TVM_NUM_THREADS=1 python tools/bench/dynamic_profile.py linear 1024

Prints a table (ms per run, static / dynamic) and writes ``tools/bench/results/dynamic_profile.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dynamic_profile.json")


def _op_group(symbol: str) -> str:
    """``fused_matmul2_add6_divide`` -> ``fused_matmul_add_divide``: TVM's per-shape numbering removed."""
    return re.sub(r"(?<=[a-z][a-z])\d+(?=_|$)", "", symbol)


def profile_calls(runner, feeds: dict, reps: int) -> dict[str, float]:
    """Seconds per run spent in each VM call group of ``runner`` (a :class:`targets.Runner`) over ``reps`` runs."""
    call = runner.prepare(feeds)
    call()  # warm-up: first-touch allocations
    acc: collections.Counter = collections.Counter()
    started: dict = {}

    def instrument(_func, symbol, before, _ret, *_args):
        if before:
            started[symbol] = time.perf_counter()
        else:
            acc[_op_group(symbol)] += time.perf_counter() - started[symbol]
        return 0

    runner.vm.set_instrument(instrument)
    try:
        for _ in range(reps):
            call()
    finally:
        runner.vm.set_instrument(lambda *_a: 0)
    return {k: v / reps for k, v in acc.items()}


def _source_key() -> str:
    """A short hash of every ``.py`` file under targets/ and rewrite/ (what decides the compiled artefacts)."""
    import hashlib
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    h = hashlib.sha256()
    for pkg in ("targets", "rewrite"):
        for dirpath, _dirs, files in sorted(os.walk(os.path.join(root, pkg))):
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


def _artefacts(kind: str, dims: list[int], cache: str):
    """(model path, dynamic artefact path, static artefact path, feeds) for ``minilm B N`` or ``linear N``."""
    import lowering_dynamic as ld

    from targets import Runner, compile_model

    os.makedirs(cache, exist_ok=True)
    if kind == "minilm":
        model = os.path.join(cache, "minilm.onnx")
        if not os.path.exists(model):
            import rewrite
            from rewrite.hf import minilm_path
            from rewrite.io import load_model
            rewrite.export(load_model(minilm_path()), model)
        dyn_path = os.path.join(cache, "minilm_dyn.so")
        if not os.path.exists(dyn_path):
            compile_model(model, "host", dyn_path, shapes={"input_ids": [(1, 8), (1, 512)]})
        names = [i["name"] for i in Runner(dyn_path).meta["inputs"]]
        feeds = ld._minilm_feeds(dims[0], dims[1], names)
    else:
        model = os.path.join(cache, "linear.onnx")
        if not os.path.exists(model):
            ld._linear_attention_onnx(model)
        dyn_path = os.path.join(cache, "linear_dyn.so")
        if not os.path.exists(dyn_path):
            compile_model(model, "host", dyn_path, shapes=None)
        rng = np.random.default_rng(0)
        feeds = {k: rng.standard_normal((1, 8, dims[0], 64)).astype(np.float32) for k in ("q", "k", "v")}
    tag = "x".join(str(d) for d in dims)
    static_path = os.path.join(cache, f"{kind}_static_{tag}.so")
    if not os.path.exists(static_path):
        compile_model(model, "host", static_path, shapes={k: list(v.shape) for k, v in feeds.items()})
    return model, dyn_path, static_path, feeds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("minilm", "linear"))
    ap.add_argument("dims", type=int, nargs="+", help="minilm: BATCH N; linear: N")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "softswap", "dynprof"))
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if len(args.dims) != (2 if args.kind == "minilm" else 1):
        ap.error(f"{args.kind} takes {'BATCH N' if args.kind == 'minilm' else 'N'}")
    import lowering_dynamic as ld

    from targets import Runner
    from targets.bench import ort_session, set_tvm_threads

    threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    set_tvm_threads(threads)
    model, dyn_path, static_path, feeds = _artefacts(args.kind, args.dims, os.path.join(args.cache, _source_key()))
    runners = {"static": Runner(static_path), "dynamic": Runner(dyn_path)}
    want = ort_session(model, 1).run(None, feeds)
    for name, r in runners.items():
        err = ld._max_rel_err(list(r.run(feeds).values()), want)
        if err > 1e-4:
            raise SystemExit(f"{name} artefact differs from onnxruntime by {err:.2e}")
    per = {name: collections.Counter() for name in runners}
    for _ in range(args.reps):  # alternate single runs so load changes hit both builds alike
        for name, r in runners.items():
            per[name].update(profile_calls(r, feeds, 1))
    per = {name: {k: v / args.reps for k, v in c.items()} for name, c in per.items()}
    groups = sorted(set(per["static"]) | set(per["dynamic"]),
                    key=lambda g: -(per["static"].get(g, 0) + per["dynamic"].get(g, 0)))
    label = f"{args.kind} {'x'.join(map(str, args.dims))}"
    print(f"{label}: ms per run by VM call, {threads} thread(s), {args.reps} alternating runs")
    print(f"{'call':64s} {'static':>9s} {'dynamic':>9s}")
    for g in groups:
        s, d = per["static"].get(g, 0) * 1e3, per["dynamic"].get(g, 0) * 1e3
        if s + d >= 0.01:
            print(f"{g[:64]:64s} {s:9.3f} {d:9.3f}")
    tot = {name: sum(v.values()) * 1e3 for name, v in per.items()}
    print(f"{'total':64s} {tot['static']:9.3f} {tot['dynamic']:9.3f}  ({tot['dynamic'] / tot['static']:.2f}x)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"case": label, "threads": threads, "reps": args.reps,
                   "ms": {name: {k: round(v * 1e3, 4) for k, v in c.items()} for name, c in per.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
