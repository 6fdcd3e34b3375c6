"""``softswap compile``, ``run`` and ``bench``: the lowering's subcommands (registered by ``add_commands``).

``compile MODEL --target T -o model.so [--shape name=d0,d1 ...]`` writes a TVM library and its metadata sidecar;
``run model.so --inputs x.npz -o y.npz`` runs it (arrays keyed by input and output names); ``bench MODEL --target T``
prints TVM / onnxruntime / torch latency percentiles on the same inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError


def _parse_shapes(items: list[str] | None) -> dict[str, list[int]] | None:
    if not items:
        return None
    shapes: dict[str, list[int]] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--shape {item!r}: expected name=d0,d1,...", culprit=item)
        name, dims = item.split("=", 1)
        try:
            shapes[name.strip()] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise InputError(f"--shape {item!r}: dims must be integers", culprit=item) from None
    return shapes


def _model_for_lowering(path: str) -> tuple[Any, list[str] | None]:
    """(model, output names): an ONNX path as it is; anything else (.pt2, Hugging Face folder) through softswap's
    loader, with the output names it knows (a Hugging Face model's ``last_hidden_state`` ...)."""
    if path.endswith(".onnx"):
        if not os.path.isfile(path):
            from rewrite.errors import ModelLoadError
            raise ModelLoadError(f"{path}: no such file")
        return path, None
    from rewrite.io import load_model
    loaded = load_model(path)
    return loaded.ep, list(loaded.output_names) or None


def cmd_compile(args: argparse.Namespace) -> int:
    from . import compile_model
    model, output_names = _model_for_lowering(args.model)
    meta = compile_model(model, args.target, args.output, shapes=_parse_shapes(args.shape),
                         tune_trials=args.tune, tuning_dir=args.tuning_dir, output_names=output_names)
    print(json.dumps({k: meta[k] for k in ("target", "device", "inputs", "outputs", "import_s", "compile_s", "tuning")},
                     indent=1))
    print(f"wrote {args.output} (+ metadata {args.output}.json)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from . import Runner
    if not os.path.isfile(args.inputs):
        raise InputError(f"{args.inputs}: no such file", culprit=args.inputs)
    with np.load(args.inputs) as data:
        inputs = {k: data[k] for k in data.files}
    outputs = Runner(args.artefact).run(inputs)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise InputError(f"{out}: folder {out.parent} does not exist", culprit=str(out))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=out.parent)
    os.close(fd)
    try:
        np.savez(tmp, **outputs)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from rewrite.io import load_model
    from rewrite.verify import default_inputs

    from . import benchmark
    loaded = load_model(args.model)
    inputs = default_inputs(loaded)
    model = args.model if args.model.endswith(".onnx") else loaded.ep
    torch_module = loaded.ep.module() if loaded.kind == "fx" else None
    onnx_model = None
    if loaded.kind == "fx":
        import onnx_ir as ir
        from rewrite.io import fx_to_onnx
        onnx_model = ir.to_proto(fx_to_onnx(loaded))
    result = benchmark(model, args.target, inputs, runs=args.runs, threads=args.threads,
                       torch_module=torch_module, onnx_model=onnx_model)
    rows = [(k, v) for k, v in result.items() if isinstance(v, dict)]
    print(f"target {result['target']} ({result['target_resolved']}) on {result['cpu']}, {result['threads']} thread(s), inputs "
          + ", ".join(f"{k}{tuple(np.shape(v))}" for k, v in inputs.items()))
    print(f"{'runtime':10s} {'p50 ms':>10s} {'p90 ms':>10s} {'min ms':>10s}")
    for name, stats in rows:
        print(f"{name:10s} {stats.get('p50', float('nan')):10.3f} {stats.get('p90', float('nan')):10.3f} "
              f"{stats.get('min', float('nan')):10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def add_commands(sub: Any) -> None:
    """Add ``compile``, ``run`` and ``bench`` to the ``softswap`` subparsers."""
    p = sub.add_parser("compile", help="lower a model with TVM and write a loadable library (+ metadata)")
    p.add_argument("model", help=".onnx, .pt2 or a Hugging Face folder")
    p.add_argument("--target", required=True, help="avx2, avx512, avx512-amd, avx512-intel, cuda-sm80, cuda-sm90, host")
    p.add_argument("-o", "--output", required=True, help="library path (.so)")
    p.add_argument("--shape", action="append", metavar="NAME=D0,D1", help="fix a symbolic input shape")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="MetaSchedule trials for the matmul tasks (CPU; database cached and reused)")
    p.add_argument("--tuning-dir", default=None, help="tuning database folder (default ~/.cache/softswap/tuning)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a compiled library on inputs from an .npz")
    p.add_argument("artefact")
    p.add_argument("--inputs", required=True, help=".npz keyed by input names")
    p.add_argument("-o", "--output", required=True, help=".npz to write, keyed by output names")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="latency of TVM vs onnxruntime vs torch on the same inputs")
    p.add_argument("model")
    p.add_argument("--target", default="host", help="default: host (the best code this CPU can execute)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=cmd_bench)
