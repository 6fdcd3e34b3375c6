"""softswap.targets: lower graphs to TVM for avx2 / avx512 / cuda, export artefacts and run them.

Sets ``TVM_NUM_THREADS`` (default: the number of usable cores) before anything imports tvm.  Public names (imported
lazily so ``import targets`` stays cheap):

* ``get_target(name)``, ``target_names()``, ``TARGETS`` - named targets (targets.table)
* ``import_model(model, shapes=None)`` - ONNX / ExportedProgram -> Relax (targets.importer)
* ``compile_model(model, target, out_path, shapes=None)`` - artefact + metadata (targets.artifact)
* ``Runner(path)`` - run an artefact (targets.runner)
* ``cpu_pipeline(target)``, ``compile_relax(mod, target)`` - the CPU / CUDA Relax pipelines (targets.pipeline)
* ``benchmark(model, target, inputs, runs)`` - TVM vs onnxruntime vs torch latency percentiles (targets.bench)
* ``softmax_kernels`` - two-pass / three-pass TIR softmax kernels and their rule table
* ``errors`` - typed exceptions, base ``TargetError``
"""

from __future__ import annotations

import importlib
import os as _os

_os.environ.setdefault("TVM_NUM_THREADS", str(max(1, len(_os.sched_getaffinity(0)))))

_LAZY = {
    "get_target": "table", "target_names": "table", "target_dict": "table", "TARGETS": "table",
    "import_model": "importer", "import_onnx": "importer", "import_exported_program": "importer",
    "compile_model": "artifact", "build": "artifact", "load_metadata": "artifact",
    "Runner": "runner",
    "cpu_pipeline": "pipeline", "compile_relax": "pipeline", "benchmark": "bench",
    "TargetError": "errors", "UnsupportedOpError": "errors", "CompileError": "errors", "InputError": "errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        mod = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
