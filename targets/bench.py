"""Latency benchmarks: TVM vs onnxruntime vs torch on the same inputs.

``benchmark(model, target, inputs, runs)`` compiles ``model`` for ``target`` in memory and times it, plus
onnxruntime when the model is ONNX (or an ``onnx_model`` is given) and torch when a ``torch_module`` is given.
Latencies are wall-clock milliseconds per call after ``warmup`` calls; every runtime runs in this process with the
thread count given (TVM's pool is sized at import by ``TVM_NUM_THREADS`` and can only be lowered at run time).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from . import _env  # noqa: F401

log = logging.getLogger(__name__)


def percentiles(samples_s: list[float]) -> dict:
    """{p50, p90, p99, min, mean} in milliseconds from samples in seconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "mean": float(a.mean()), "runs": len(a)}


def time_callable(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> dict:
    """Time ``fn()`` ``runs`` times after ``warmup`` calls; returns :func:`percentiles`."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


def set_tvm_threads(n: int) -> None:
    """Lower (never raise) the TVM pool to ``n`` threads for the following calls."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(0, int(n))


def ort_session(model, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads (model: path or ModelProto)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def tvm_callable(model, target, inputs: dict, shapes: dict | None = None) -> Callable[[], object]:
    """Compile ``model`` for ``target`` in memory; return a zero-argument callable running it on ``inputs``."""
    import tvm
    from tvm import relax

    from .artifact import build
    from .importer import import_model
    from .table import ensure_executable

    ensure_executable(target)
    imp = import_model(model, shapes=shapes)
    ex = build(imp, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[i["name"]])) for i in imp.inputs]
    f = vm["main"]
    return lambda: f(*args)


def benchmark(model, target, inputs: dict, runs: int = 20, warmup: int = 3, threads: int | None = None,
              torch_module=None, onnx_model=None, shapes: dict | None = None) -> dict:
    """Latency percentiles (ms) of TVM (``target``), onnxruntime and torch on ``inputs``.

    model: anything :func:`targets.import_model` takes; ``inputs`` maps input names to numpy arrays (for a torch
    module: positional order of the dict).  Returns ``{"tvm": {...}, "ort": {...}?, "torch": {...}?}``.
    """
    import onnx

    from .pipeline import num_threads

    from .cpu import host_description
    from .table import ensure_executable, get_target

    ensure_executable(target)
    threads = threads or num_threads()
    res: dict = {"target": str(target), "target_resolved": str(get_target(target)), "cpu": host_description(),
                 "threads": threads}
    set_tvm_threads(threads)
    res["tvm"] = time_callable(tvm_callable(model, target, inputs, shapes), runs, warmup)
    onnx_src = onnx_model if onnx_model is not None else (
        model if isinstance(model, (str, onnx.ModelProto)) or hasattr(model, "__fspath__") else None)
    if onnx_src is not None:
        sess = ort_session(onnx_src, threads)
        names = [i.name for i in sess.get_inputs()]
        feeds = {n: inputs[n] for n in names}
        res["ort"] = time_callable(lambda: sess.run(None, feeds), runs, warmup)
    if torch_module is not None:
        import torch

        torch.set_num_threads(threads)
        targs = [torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()]
        with torch.inference_mode():
            res["torch"] = time_callable(lambda: torch_module(*targs), runs, warmup)
    return res
