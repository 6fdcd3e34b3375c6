"""Compile a model to a loadable library plus a metadata sidecar, atomically.

``compile_model(model, target, out_path)`` writes ``out_path`` (a ``.so`` for ``tvm.runtime.load_module``) and
``out_path + ".json"`` (input names / shapes / dtypes, output names, target, the CPU features and GPU architecture its
code requires, tool versions).  Both are written to
temporary files in the destination directory and renamed into place only after everything succeeded, so an error
never leaves a half-written artefact.  CUDA artefacts carry the CUDA C source of the device kernels (TVM JIT-compiles
it at load time; the broken ``nvptx`` path is never used); they build here without a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import time

from . import _env  # noqa: F401
from .errors import CompileError, TargetError
from .importer import Imported, import_model
from .cpu import host_description, missing_features, required_features
from .shape_ranges import has_ranges, resolve_ranges
from .table import get_target, is_cuda

log = logging.getLogger(__name__)

META_SUFFIX = ".json"
FORMAT_VERSION = 3  # 2: "requires" (CPU features, GPU arch) added; 3: "ranges" of symbolic input dims


def requirements(target) -> dict:
    """What executing code built for ``target`` needs: ``{"cpu": mcpu, "cpu_features": [LLVM ISA features],
    "gpu_arch": "sm_80" | None}``; for a CUDA target the CPU part is its host code's."""
    tgt = get_target(target)
    llvm = tgt if str(tgt.kind.name) == "llvm" else tgt.host
    mcpu = str(llvm.attrs["mcpu"]) if llvm is not None and "mcpu" in llvm.attrs else ""
    arch = str(tgt.attrs["arch"]) if is_cuda(tgt) and "arch" in tgt.attrs else None
    return {"cpu": mcpu, "cpu_features": required_features(tgt), "gpu_arch": arch}


def metadata_path(lib_path: str | os.PathLike) -> str:
    """Path of the metadata sidecar of a library."""
    return os.fspath(lib_path) + META_SUFFIX


def build(imported: Imported, target, tuning_dir: str | None = None):
    """Compile an :class:`Imported` module for a target (name, dict or Target); returns the VM executable.

    ``tuning_dir``: a MetaSchedule database written by :func:`targets.tuning.tune` (CPU targets).
    """
    from .pipeline import compile_relax

    tgt = get_target(target)
    try:
        return compile_relax(imported.mod, tgt, tuning_dir)
    except TargetError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CompileError(f"TVM compilation failed: {type(exc).__name__}: {str(exc)[:500]}",
                           culprit=str(target)) from exc


def compile_model(model, target, out_path: str | os.PathLike, shapes: dict | None = None,
                  example_inputs: tuple | None = None, tune_trials: int = 0,
                  tuning_dir: str | os.PathLike | None = None, output_names: list[str] | None = None,
                  tune_remote=None) -> dict:
    """Import, compile and export ``model`` for ``target`` to ``out_path``; returns the metadata dict.

    model: .onnx path, onnx.ModelProto, torch.export.ExportedProgram, or nn.Module with ``example_inputs``.
    target: a name of ``targets.table`` (``avx2``, ``avx512``, ``cuda-sm80``, ...), a dict or a tvm Target.
    shapes: {input name: dims} fixing symbolic input dims (ONNX; a torch program is re-exported at those shapes);
    a dim given as a ``(lo, hi)`` range stays symbolic and the range is recorded in the metadata (``"ranges"``,
    checked by :class:`targets.Runner`; see :mod:`targets.shape_ranges`).
    output_names: names of a torch program's outputs (ONNX models carry their own).
    tune_trials: MetaSchedule trials for the matmul tasks (0 = untuned); the database lives in ``tuning_dir``
    (default ``~/.cache/softswap/tuning``) and is reused across runs (:mod:`targets.tuning`).
    tune_remote: a :class:`targets.rpc_tuning.RemoteDevice` to measure the candidates on RPC workers registered
    with a TVM tracker (checked before the model is imported).
    Raises a subclass of :class:`targets.errors.TargetError`; on error nothing is left at ``out_path``.
    """
    import tvm

    out_path = os.fspath(out_path)
    tgt = get_target(target)
    out_dir = os.path.dirname(os.path.abspath(out_path)) or "."
    if not os.path.isdir(out_dir):
        raise CompileError(f"output directory does not exist: {out_dir}", culprit=out_path)
    if tune_trials and tune_remote is not None:
        from .rpc_tuning import check_tracker
        check_tracker(tune_remote)  # an unreachable tracker fails in seconds, before any import or tuning
    t0 = time.perf_counter()
    imported = import_model(model, shapes=shapes, example_inputs=example_inputs, output_names=output_names)
    # the ranges only gate inputs: TVM's upper-bound memory planning would allocate every intermediate at its
    # largest size up front (attention scores at batch 32 x length 4096: tens of GB)
    ranges = resolve_ranges(shapes, imported.inputs) if has_ranges(shapes) else None
    tuning = None
    if tune_trials:
        from .tuning import default_tuning_dir, tune, tuning_target
        tgt = tuning_target(tgt)  # the database is keyed by the target the records were tuned for
        tuning = tune(imported.mod, tgt, tuning_dir or default_tuning_dir(), tune_trials, remote=tune_remote)
    t1 = time.perf_counter()
    ex = build(imported, tgt, tuning["apply_dir"] if tuning else None)
    t2 = time.perf_counter()
    needs = requirements(tgt)
    lacking = missing_features(needs["cpu_features"])
    if lacking:
        log.warning("%s is compiled for %s, whose code this host (%s) cannot execute: it lacks %s",
                    out_path, needs["cpu"] or str(tgt), host_description(), ", ".join(lacking))
    meta = {
        "format": FORMAT_VERSION,
        "target_name": target if isinstance(target, str) else None,
        "target": str(tgt),
        "device": "cuda" if is_cuda(tgt) else "cpu",
        "requires": needs,
        "source": imported.source,
        "inputs": imported.inputs,
        "outputs": imported.outputs,
        "ranges": ranges,
        "tvm_version": tvm.__version__,
        "import_s": round(t1 - t0, 3),
        "tuning": tuning,
        "compile_s": round(t2 - t1, 3),
    }
    from rewrite.atomic import atomic_output
    from rewrite.errors import OutputPathError

    try:
        # the sidecar is moved into place first and the library last, so a reader never pairs a new library with
        # an old sidecar; on any error neither file changes (rewrite.atomic)
        with atomic_output(out_path) as tmp_lib:
            ex.export_library(str(tmp_lib))
            with atomic_output(metadata_path(out_path)) as tmp_meta:
                tmp_meta.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    except OutputPathError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CompileError(f"export failed: {type(exc).__name__}: {exc}", culprit=out_path) from exc
    log.info("compiled %s for %s -> %s (%.2fs import, %.2fs compile)", imported.source, tgt, out_path,
             t1 - t0, t2 - t1)
    return meta


def load_metadata(lib_path: str | os.PathLike) -> dict:
    """Read the sidecar of a library; raises ArtifactError when missing or malformed."""
    from .errors import ArtifactError

    p = metadata_path(lib_path)
    try:
        with open(p, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read artefact metadata: {exc}", culprit=p) from exc
    for key in ("inputs", "outputs", "target"):
        if key not in meta:
            raise ArtifactError(f"metadata lacks {key!r}", culprit=p)
    return meta
