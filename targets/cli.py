"""``softswap compile``, ``run`` and ``bench``: the lowering's subcommands (registered by ``add_commands``).

``compile MODEL --target T -o model.so [--shape name=d0,d1 ...]`` (a dim ``lo..hi`` stays symbolic) writes a TVM library and its metadata sidecar;
``run model.so --inputs x.npz -o y.npz`` runs it (arrays keyed by input and output names); ``bench MODEL --target T``
prints TVM / onnxruntime / torch latency percentiles on the same inputs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import InputError


def _parse_shapes(items: list[str] | None) -> dict[str, list] | None:
    """``--shape name=d0,d1`` (or ``d0xd1``) items; every dim a positive integer or a range ``lo..hi`` (kept
    symbolic, see :mod:`targets.shape_ranges`), every name given once."""
    from .shape_ranges import parse_dim

    if not items:
        return None
    shapes: dict[str, list] = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise InputError(f"--shape {item!r}: expected name=d0,d1,... (a dim: an integer or lo..hi)", culprit=item)
        name, dims = item.split("=", 1)
        values = [parse_dim(d, item) for d in dims.replace("x", ",").split(",")]
        if name.strip() in shapes:
            raise InputError(f"--shape {item!r}: input {name.strip()!r} given twice", culprit=item)
        shapes[name.strip()] = values
    return shapes


def _check_shapes(loaded: Any, shapes: dict[str, list] | None) -> None:
    """Every ``--shape`` names a graph input and gives as many dims as that input has; a range falls on a dim the
    model leaves symbolic."""
    from .shape_ranges import is_range

    if not shapes or loaded.kind != "onnx":
        return
    graph_inputs = {v.name: v for v in loaded.onnx.graph.inputs if not v.is_initializer()}
    for name, dims in shapes.items():
        if name not in graph_inputs:
            raise InputError(f"--shape {name}=...: the model has no input {name!r} (inputs: {sorted(graph_inputs)})",
                             culprit=name)
        shape = graph_inputs[name].shape
        text = ",".join(f"{d[0]}..{d[1]}" if is_range(d) else str(d) for d in dims)
        if shape is not None and len(shape) != len(dims):
            raise InputError(f"--shape {name}={text}: input {name!r} has {len(shape)} dims, {len(dims)} given",
                             culprit=name)
        for axis, dim in enumerate(dims):
            if shape is not None and is_range(dim) and isinstance(shape[axis], int):
                raise InputError(f"--shape {name}={text}: dim {axis} of {name!r} is fixed at {shape[axis]} in the "
                                 f"model; a range needs a symbolic dim", culprit=name)


def _check_output(path: str, flag: str = "-o") -> None:
    """The output's folder exists and is writable, and the path is not a folder (checked before any work)."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{flag} {out}: is a folder; give a file path", culprit=str(out))
    if not out.parent.is_dir():
        raise InputError(f"{flag} {out}: folder {out.parent} does not exist", culprit=str(out))
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {out}: folder {out.parent} is not writable", culprit=str(out))


def _model_for_lowering(path: str, shapes: dict[str, list[int]] | None = None) -> tuple[Any, list[str] | None]:
    """(model, output names): an ONNX model as softswap's loader read and checked it (readable, well-formed graph,
    external data beside the file); anything else (.pt2, Hugging Face folder) through softswap's loader, with
    the output names it knows (a Hugging Face model's ``last_hidden_state`` ...)."""
    from rewrite.io import load_model
    loaded = load_model(path)
    _check_shapes(loaded, shapes)
    if loaded.kind == "onnx":
        return loaded.onnx, None  # read once: the lowering takes the checked graph, not the path again
    return loaded.ep, list(loaded.output_names) or None


@contextlib.contextmanager
def _naming_the_model(model: str) -> Iterator[None]:
    """Lowering errors name a node or a target; prefix the model file so the one error line names it too.
    Failures TVM raises outside the importer's own wrapping become :class:`CompileError` with their first line."""
    from rewrite.errors import SoftswapError, first_line
    from rewrite.interrupts import reraise_if_interrupted

    from .errors import CompileError, TargetError
    try:
        yield
    except TargetError as exc:
        if model in str(exc):
            raise
        named = type(exc)(f"{model}: {exc}")
        named.culprit = exc.culprit
        raise named from exc
    except SoftswapError:
        raise
    except Exception as exc:  # noqa: BLE001 - a TVM / torch failure the lowering did not type
        reraise_if_interrupted(exc)
        raise CompileError(f"{model}: lowering failed ({first_line(exc)})") from exc


def cmd_compile(args: argparse.Namespace) -> int:
    from . import compile_model
    if args.tune < 0:
        raise InputError(f"--tune must be >= 0, got {args.tune}", culprit="--tune")
    _check_output(args.output)
    remote = None
    if args.rpc is not None or args.device_key is not None:
        from .rpc_tuning import check_tracker, parse_rpc
        if args.rpc is None:
            raise InputError("--device-key needs --rpc HOST:PORT (the TVM RPC tracker)", culprit="--device-key")
        if args.tune <= 0:
            raise InputError(f"--rpc {args.rpc} needs --tune N > 0 (candidates are measured remotely)",
                             culprit="--rpc")
        remote = parse_rpc(args.rpc, args.device_key)
        check_tracker(remote)  # fails in seconds, before the model is read
    shapes = _parse_shapes(args.shape)
    model, output_names = _model_for_lowering(args.model, shapes)
    with _naming_the_model(args.model):
        meta = compile_model(model, args.target, args.output, shapes=shapes, tune_trials=args.tune,
                             tuning_dir=args.tuning_dir, output_names=output_names, tune_remote=remote)
    keys = ("target", "device", "inputs", "outputs", "ranges", "import_s", "compile_s", "tuning")
    print(json.dumps({k: meta[k] for k in keys}, indent=1))
    print(f"wrote {args.output} (+ metadata {args.output}.json)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from . import Runner
    _check_output(args.output)
    runner = Runner(args.artefact)
    if not os.path.isfile(args.inputs):
        raise InputError(f"{args.inputs}: no such file", culprit=args.inputs)
    try:
        with np.load(args.inputs, allow_pickle=False) as data:
            inputs = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - not an .npz, pickled object arrays (refused), truncated zip
        from rewrite.errors import first_line
        raise InputError(f"{args.inputs}: not a readable .npz of arrays ({first_line(exc)})",
                         culprit=args.inputs) from None
    outputs = runner.run(inputs)
    out = Path(args.output)
    from rewrite.atomic import atomic_output
    with atomic_output(out) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **outputs)
    print(f"wrote {out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from rewrite.io import load_model
    from rewrite.verify import default_inputs

    from . import benchmark
    if args.runs < 1:
        raise InputError(f"--runs must be >= 1, got {args.runs}", culprit="--runs")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}", culprit="--threads")
    if args.json:
        _check_output(args.json, "--json")
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
        from rewrite.atomic import write_text
        write_text(args.json, json.dumps(result, indent=1))
    return 0


def add_commands(sub: Any) -> None:
    """Add ``compile``, ``run`` and ``bench`` to the ``softswap`` subparsers."""
    p = sub.add_parser("compile", help="lower a model with TVM and write a loadable library (+ metadata)")
    p.add_argument("model", help=".onnx, .pt2 or a Hugging Face folder")
    p.add_argument("--target", required=True, help="avx2, avx512, avx512-amd, avx512-intel, cuda-sm80, cuda-sm90, host")
    p.add_argument("-o", "--output", required=True, help="library path (.so)")
    p.add_argument("--shape", action="append", metavar="NAME=D0,D1",
                   help="fix a symbolic input shape; a dim lo..hi stays symbolic and the artefact accepts sizes in "
                        "that range (checked by run)")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="MetaSchedule trials for the matmul tasks (CPU; database cached and reused)")
    p.add_argument("--tuning-dir", default=None, help="tuning database folder (default ~/.cache/softswap/tuning)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT",
                   help="with --tune: measure candidates on RPC servers registered with this TVM tracker")
    p.add_argument("--device-key", default=None, metavar="KEY", help="the key the RPC servers registered with")
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
