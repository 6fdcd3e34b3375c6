"""Loading and saving models of both graph kinds, with typed errors and atomic writes.

A :class:`LoadedModel` is what every public function works on: an ``ExportedProgram`` (FX kind) or an
``onnx_ir.Model`` (ONNX kind), plus named example inputs and input/output names.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx
import onnx_ir as ir
import torch

from .atomic import atomic_folder, atomic_output
from .errors import ModelLoadError, OutputPathError, UnsupportedModelError, first_line
from .interrupts import reraise_if_interrupted

log = logging.getLogger(__name__)

TWO_GB = 2 * 1024 ** 3


@dataclass
class LoadedModel:
    """A model of either graph kind, ready for recognition.

    ``example_inputs`` maps input names to tensors (FX) or arrays (ONNX); ``dynamic_shapes`` is the
    ``torch.export`` spec used to export an ``nn.Module`` (kept so a rewritten program can be re-exported).
    """

    kind: str
    source: str
    ep: Any = None
    onnx: ir.Model | None = None
    example_inputs: dict[str, Any] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------

def _check_external_data(model: ir.Model, path: Path) -> None:
    """External data must lie inside the model's folder, exist and be long enough. Every external tensor is
    anchored to the model file's folder (absolute), so later steps never resolve it against the working
    directory."""
    base = path.parent.resolve()
    for init in model.graph.initializers.values():
        tensor = init.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor.base_dir = str(base)
            location = (base / tensor.location).resolve()
            if base not in location.parents and location != base:
                raise ModelLoadError(f"{path}: initializer {init.name!r} points at external data "
                                     f"{tensor.location!r}, outside the model's folder {base}")
            if not location.is_file():
                raise ModelLoadError(f"{path}: initializer {init.name!r}: external data file {location} is missing")
            end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else 0)
            if end > location.stat().st_size:
                raise ModelLoadError(f"{path}: initializer {init.name!r}: external data file {location} has "
                                     f"{location.stat().st_size} bytes, the model reads up to byte {end} (truncated)")


def _check_graph(model: ir.Model, path: Path) -> None:
    """Every value a node reads is a graph input, an initializer or the output of an earlier node (no cycle,
    no undefined value); ONNX requires the nodes in topological order. Raises :class:`ModelLoadError` naming
    the node and the value."""
    seen: set[int] = set()
    for node in model.graph:
        label = node.name or f"{node.op_type} node"
        for value in node.inputs:
            if value is None or value.is_graph_input() or value.is_initializer():
                continue
            producer = value.producer()
            if producer is None:
                raise ModelLoadError(f"{path}: node {label!r} reads {value.name!r}, which no node, input or "
                                     f"initializer defines [culprit: {label}]")
            if id(producer) not in seen:
                raise ModelLoadError(f"{path}: node {label!r} reads {value.name!r} before node "
                                     f"{producer.name or producer.op_type!r} produces it (a cycle, or nodes out of "
                                     f"topological order) [culprit: {label}]")
        seen.add(id(node))
    for value in model.graph.outputs:
        if value.producer() is None and not value.is_graph_input() and not value.is_initializer():
            raise ModelLoadError(f"{path}: graph output {value.name!r} is not produced by any node")


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send what exporters print to stdout (progress banners) to the debug log instead."""
    import io as _io
    buffer = _io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue():
        log.debug("%s", buffer.getvalue().rstrip())


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: building a 100k-node IR allocates millions of objects and the
    collector's repeated full scans make that superlinear (measured: 9.2 s → 4.9 s for 100k nodes)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_onnx(path: str | os.PathLike[str]) -> LoadedModel:
    """Load an ``.onnx`` file lazily (external weights are not read)."""
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"{file}: no such file")
    try:
        with paused_gc():
            model = ir.load(str(file))
    except Exception as exc:  # protobuf DecodeError, onnx errors: not an ONNX file
        reraise_if_interrupted(exc)
        raise ModelLoadError(f"{file}: not a readable ONNX model ({first_line(exc)})") from exc
    if model.graph is None or (len(model.graph) == 0 and not model.graph.outputs):
        raise ModelLoadError(f"{file}: ONNX model has an empty graph (truncated or not an ONNX file)")
    _check_external_data(model, file)
    _check_graph(model, file)
    _infer_shapes(model)
    loaded = LoadedModel(kind="onnx", source=str(file), onnx=model,
                         input_names=[v.name for v in model.graph.inputs if not v.is_initializer()],
                         output_names=[v.name for v in model.graph.outputs])
    return loaded


def _infer_shapes(model: ir.Model) -> None:
    """Fill in missing value shapes with ONNX shape inference (in memory; the file is untouched)."""
    missing = sum(1 for n in model.graph for v in n.outputs if v.shape is None)
    if not missing:
        return
    try:
        from onnx_ir.passes.common import ShapeInferencePass
        ShapeInferencePass()(model)
    except Exception as exc:  # unknown custom ops etc.: recognition still works where shapes are known
        reraise_if_interrupted(exc)
        log.warning("shape inference failed (%s); continuing with the shapes in the file", exc)


def load_pt2(path: str | os.PathLike[str], trust_remote_code: bool | None = None) -> LoadedModel:
    """Load a ``.pt2`` written by ``torch.export.save`` (Hugging Face ``ModelOutput`` programs included).

    Pickled members are checked before torch unpickles anything (:mod:`rewrite.safe_load`);
    ``trust_remote_code=True`` skips the check. Raises :class:`UnsafeModelError` / :class:`ModelLoadError`.
    """
    from .hf import Pt2LoadError, load_pt2 as _load
    try:
        ep = _load(path, trust_remote_code=trust_remote_code)
    except Pt2LoadError as exc:
        raise ModelLoadError(str(exc)) from exc
    return from_exported_program(ep, source=str(path))


def _user_input_names(ep: Any) -> list[str]:
    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]


def from_exported_program(ep: Any, source: str = "<ExportedProgram>", output_names: list[str] | None = None,
                          example_inputs: Mapping[str, Any] | None = None,
                          dynamic_shapes: Any = None) -> LoadedModel:
    """Wrap an ``ExportedProgram``; example inputs come from the program when it carries them."""
    names = _user_input_names(ep)
    examples: dict[str, Any] = dict(example_inputs or {})
    if not examples and getattr(ep, "example_inputs", None) is not None:
        args, kwargs = ep.example_inputs
        flat = list(args) + list(kwargs.values())
        flat = torch.utils._pytree.tree_leaves(flat)
        examples = {n: t for n, t in zip(names, flat) if isinstance(t, torch.Tensor)}
    n_out = len(ep.graph_signature.user_outputs)
    outs = output_names or [f"output{i}" for i in range(n_out)]
    return LoadedModel(kind="fx", source=source, ep=ep, example_inputs=examples, input_names=names,
                       output_names=outs, extra={"dynamic_shapes": dynamic_shapes})


def export_module(module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor] | tuple,
                  dynamic_shapes: Any = None, source: str = "<nn.Module>",
                  output_names: list[str] | None = None) -> LoadedModel:
    """``torch.export`` an ``nn.Module`` (eval mode) with named example inputs."""
    module = module.eval()
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    try:
        ep = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # not BaseException: Ctrl-C is never retried
        reraise_if_interrupted(exc)
        if dynamic_shapes is None:
            raise UnsupportedModelError(f"{source}: torch.export failed ({first_line(exc)})") from exc
        log.warning("%s: export with dynamic shapes failed (%s); retrying with static shapes", source,
                    first_line(exc))
        try:
            ep = torch.export.export(module, args, kwargs, strict=False)
        except Exception as exc2:
            reraise_if_interrupted(exc2)
            raise UnsupportedModelError(f"{source}: torch.export failed ({first_line(exc2)})") from exc2
        dynamic_shapes = None
    names = _user_input_names(ep)
    flat = list(args) + list(kwargs.values())
    return from_exported_program(ep, source=source, output_names=output_names,
                                 example_inputs=dict(zip(names, flat)), dynamic_shapes=dynamic_shapes)


def load_hf(path: str | os.PathLike[str], attn_implementation: str = "sdpa") -> LoadedModel:
    """Build a Hugging Face model folder offline and export it."""
    from .hf import HFLoadError, load_hf_folder
    try:
        hf = load_hf_folder(path, attn_implementation=attn_implementation)
    except HFLoadError as exc:
        raise ModelLoadError(str(exc)) from exc
    loaded = export_module(hf.module, hf.example_inputs, dynamic_shapes=hf.dynamic_shapes, source=str(path),
                           output_names=hf.output_names)
    loaded.extra["hf"] = hf
    return loaded


def load_model(model: Any, example_inputs: Any = None, dynamic_shapes: Any = None,
               trust_remote_code: bool | None = None) -> LoadedModel:
    """Load anything softswap accepts: a path (``.onnx``, ``.pt2``, Hugging Face folder), an ``nn.Module`` (with
    ``example_inputs``), an ``ExportedProgram``, an ``onnx.ModelProto`` / ``onnx_ir.Model``, or a LoadedModel.

    Opening a file never runs code from it: ``.pt2`` pickles are checked first and Hugging Face weights load
    weights-only; ``trust_remote_code=True`` (default: :func:`rewrite.safe_load.trusting_remote_code`'s setting)
    lifts the ``.pt2`` check for files whose author you trust (docs/security.md)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            return load_hf(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file or folder")
        if path.suffix == ".onnx":
            return load_onnx(path)
        if path.suffix == ".pt2":
            return load_pt2(path, trust_remote_code)
        raise ModelLoadError(f"{path}: unknown model format (expected .onnx, .pt2 or a Hugging Face folder)")
    if isinstance(model, torch.export.ExportedProgram):
        return from_exported_program(model, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes)
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise UnsupportedModelError("an nn.Module needs example_inputs (a tuple or a dict of tensors)")
        return export_module(model, example_inputs, dynamic_shapes)
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    if isinstance(model, ir.Model):
        _infer_shapes(model)
        return LoadedModel(kind="onnx", source="<onnx model>", onnx=model,
                           input_names=[v.name for v in model.graph.inputs if not v.is_initializer()],
                           output_names=[v.name for v in model.graph.outputs])
    raise UnsupportedModelError(f"cannot load a {type(model).__name__}: expected a path, nn.Module, "
                                "ExportedProgram or ONNX model")


# ------------------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------------------

def check_output_path(out: str | os.PathLike[str], suffixes: tuple[str, ...] = (".onnx", ".pt2")) -> Path:
    """Validate an output path before any work is done: known suffix, existing folder."""
    path = Path(out)
    if path.suffix not in suffixes:
        raise OutputPathError(f"{path}: output must end in one of {', '.join(suffixes)}")
    if not path.parent.exists() or not path.parent.is_dir():
        raise OutputPathError(f"{path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise OutputPathError(f"{path}: is a folder; give a file path")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: folder {path.parent} is not writable")
    return path


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def save_onnx(model: ir.Model, out: str | os.PathLike[str]) -> Path:
    """Write ``model`` atomically (:mod:`rewrite.atomic`: the file appears complete or not at all); weights go to
    ``<name>.data`` beside it when they exceed 2 GB."""
    path = check_output_path(out, (".onnx",))
    if any(isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values()) \
            and _initializer_bytes(model) <= TWO_GB:
        # weights the input kept beside itself are copied in: the output must not point into the input's folder
        from onnx_ir.external_data import load_to_model
        model = load_to_model(model.clone())
    with atomic_folder(path) as tmpdir:
        tmp = tmpdir / path.name
        if _initializer_bytes(model) > TWO_GB:
            ir.save(model, str(tmp), external_data=path.name + ".data")
        else:
            ir.save(model, str(tmp))
    return path


def save_pt2(ep: Any, out: str | os.PathLike[str]) -> Path:
    """``torch.export.save`` atomically."""
    path = check_output_path(out, (".pt2",))
    with atomic_output(path) as tmp:
        torch.export.save(ep, str(tmp))
    return path


def fx_to_onnx(loaded: LoadedModel, opset: int = 18) -> ir.Model:
    """Export an FX-kind model to ONNX with the torch dynamo exporter (names kept)."""
    try:
        with quiet_stdout():
            prog = torch.onnx.export(loaded.ep, (), dynamo=True, opset_version=opset,
                                 input_names=loaded.input_names, output_names=loaded.output_names,
                                 verbose=False)
    except Exception as exc:
        reraise_if_interrupted(exc)
        raise UnsupportedModelError(f"{loaded.source}: ONNX export of the program failed ({first_line(exc)})") from exc
    return prog.model


# ------------------------------------------------------------------------------------------------------------
# example inputs for ONNX graphs
# ------------------------------------------------------------------------------------------------------------

_NP = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64,
       ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.BOOL: np.bool_}


def _vocab_limit(model: ir.Model, value: ir.Value) -> int:
    for use in value.uses():
        node = use.node
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].shape is not None:
            dim = node.inputs[0].shape[0]
            if isinstance(dim, int):
                return dim
    return 100


def synth_inputs(loaded: LoadedModel, batch: int = 2, seq: int = 16, seed: int = 0,
                 dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Example inputs for an ONNX graph from its input types: symbolic dims become ``batch`` (first axis) or
    ``seq``; ids stay below the embedding size; inputs named like masks get ones with padding at the end of
    every other row."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for value in loaded.onnx.graph.inputs:
        if value.is_initializer():
            continue
        shape = []
        for i, d in enumerate(value.shape or []):
            if isinstance(d, int):
                shape.append(d)
            elif dims and str(d) in dims:
                shape.append(dims[str(d)])
            else:
                shape.append(batch if i == 0 else seq)
        np_type = _NP.get(value.dtype)
        if np_type is None:
            raise UnsupportedModelError(f"{loaded.source}: input {value.name!r} has dtype {value.dtype}, which has no "
                                        "synthetic inputs (supported: " + ", ".join(t.name for t in _NP) + ")")
        name = value.name.lower()
        if "mask" in name:
            arr = np.ones(shape, dtype=np_type)
            if arr.ndim == 2 and arr.shape[1] > 2:
                arr[1::2, -max(1, arr.shape[1] // 4):] = 0
        elif "token_type" in name or "position" in name:
            arr = np.zeros(shape, dtype=np_type) if "token_type" in name else \
                np.broadcast_to(np.arange(shape[-1]), shape).astype(np_type)
        elif np.issubdtype(np_type, np.integer):
            arr = rng.integers(0, max(1, min(_vocab_limit(loaded.onnx, value), 1000)), size=shape).astype(np_type)
        elif np_type is np.bool_:  # True and False in every row: no convention masks a whole row
            arr = np.ones(shape, dtype=bool)
            if arr.ndim >= 1 and arr.shape[-1] >= 2:
                arr[..., -max(1, arr.shape[-1] // 4):] = False
        else:
            arr = rng.standard_normal(shape).astype(np_type)
        out[value.name] = arr
    return out


def _ort_culprit(model: ir.Model, message: str) -> str | None:
    """The node an onnxruntime message is about: named in it, or of the ``domain:OpType`` it names."""
    for node in model.graph:
        if node.name and node.name in message:
            return node.name
    for node in model.graph:
        if f"{node.domain}:{node.op_type}" in message or f"{node.op_type}(" in message:
            return node.name or (node.outputs[0].name if node.outputs else node.op_type)
    return None


def ort_error(model: ir.Model, exc: Exception, source: str | None, doing: str) -> UnsupportedModelError:
    """An onnxruntime failure as one typed error: the file, what failed, ORT's first line, the culprit node."""
    message = str(exc)
    culprit = _ort_culprit(model, message)
    where = source or "<onnx model>"
    text = f"{where}: onnxruntime {doing} ({first_line(exc)})"
    return UnsupportedModelError(text + (f" [culprit: {culprit}]" if culprit else ""))


def ort_session(model: ir.Model, optimize: bool = False, source: str | None = None) -> Any:
    """An onnxruntime CPU session for an in-memory model (external weights are read; > 2 GB goes via a file).

    Raises :class:`UnsupportedModelError` naming ``source`` and the node onnxruntime rejected (an unknown custom
    op, an invalid graph) with onnxruntime's first line.
    """
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors come back as exceptions; ORT's own stderr lines would double them
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if _initializer_bytes(model) > TWO_GB * 0.9:
            # protobuf cannot hold > 2 GB: onnxruntime reads it from a temporary folder, removed once the session
            # has read it (on POSIX a mapped weights file stays valid after its name is gone)
            tmpdir = tempfile.mkdtemp(prefix="softswap-ort-")
            try:
                path = os.path.join(tmpdir, "model.onnx")
                ir.save(model, path, external_data="model.onnx.data")
                return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        from onnx_ir.external_data import load_to_model
        proto = ir.to_proto(load_to_model(model.clone()))
        from onnx.external_data_helper import uses_external_data
        for tensor in proto.graph.initializer:
            if uses_external_data(tensor):
                raise UnsupportedModelError(f"{source or '<onnx model>'}: initializer {tensor.name!r}: external data "
                                            "could not be read")
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except UnsupportedModelError:
        raise
    except Exception as exc:  # onnxruntime Fail / InvalidGraph / NotImplemented, onnx_ir read errors
        reraise_if_interrupted(exc)
        raise ort_error(model, exc, source, "cannot load the model") from exc


def ort_run(session: Any, feeds: Mapping[str, Any], model: ir.Model, source: str | None = None) -> list[Any]:
    """``session.run(None, feeds)``; a failure raises :class:`UnsupportedModelError` naming the node."""
    try:
        return session.run(None, dict(feeds))
    except Exception as exc:  # shape errors of symbolic dims, unsupported dtypes at run time
        reraise_if_interrupted(exc)
        raise ort_error(model, exc, source, "failed to run the model") from exc
