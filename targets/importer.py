"""Import a model into a TVM Relax IRModule, normalizing first what the frontends get wrong.

Accepted models: a path to an ``.onnx`` file, an ``onnx.ModelProto``, a ``torch.export.ExportedProgram``, or a
``torch.nn.Module`` together with example inputs.  :func:`import_model` returns an :class:`Imported` record with the
module and the input / output names, shapes and dtypes (the artefact metadata).
"""

from __future__ import annotations

import dataclasses
import contextlib
import gc
import io
import logging
import os
from typing import Any

from . import _env  # noqa: F401
import onnx

from .errors import ImportFailedError, LoweringLoadError, UnsupportedOpError
from . import onnx_converters
from .onnx_normalize import normalize_onnx

log = logging.getLogger(__name__)

#: ATen ops TVM 0.27's torch frontend cannot lower; SOFT therefore uses Newton-Schulz iterations, not an inverse.
UNSUPPORTED_ATEN = frozenset({"linalg_inv", "linalg_inv_ex", "linalg_pinv", "linalg_solve", "linalg_solve_ex",
                              "linalg_lu_factor_ex", "_linalg_check_errors"})

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                11: "float64", 16: "bfloat16"}


@dataclasses.dataclass
class Imported:
    """A Relax module plus its I/O signature.  Shapes use ints for static dims and strings for symbolic ones."""

    mod: Any
    inputs: list[dict]
    outputs: list[dict]
    source: str


def _onnx_io(vis, shapes: dict | None) -> list[dict]:
    out = []
    for vi in vis:
        tt = vi.type.tensor_type
        dims: list = []
        for d in tt.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
        if shapes and vi.name in shapes:
            dims = [int(x) for x in shapes[vi.name]]
        out.append({"name": vi.name, "shape": dims, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))})
    return out


def load_onnx(model) -> onnx.ModelProto:
    """A ModelProto with its weights in memory, from a ModelProto (returned as is), an ``onnx_ir.Model``, or a path.

    A path is read by the engine's loader (:func:`rewrite.io.load_onnx`: the graph checked, external data resolved
    against the model file and confined to its folder), so ``softswap compile`` reads a model the way every other
    command does; its errors become :class:`LoweringLoadError` naming the file.
    """
    import onnx_ir as ir

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, ir.Model):
        return _proto_with_weights(model)
    from rewrite.errors import ModelLoadError
    from rewrite.io import load_onnx as engine_load_onnx

    path = os.fspath(model)
    try:
        loaded = engine_load_onnx(path)
    except ModelLoadError as exc:
        raise LoweringLoadError(str(exc), culprit=path) from exc
    return _proto_with_weights(loaded.onnx)


def _proto_with_weights(model) -> onnx.ModelProto:
    """``model`` (onnx_ir) as a ModelProto whose external weights are read into it."""
    import onnx_ir as ir
    from onnx_ir.external_data import load_to_model

    return ir.to_proto(load_to_model(model))


def _check_supported(model: onnx.ModelProto) -> None:
    from tvm.relax.frontend.onnx import onnx_frontend

    convert_map = onnx_frontend._get_convert_map()  # noqa: SLF001 - the frontend's own op table
    for node in model.graph.node:
        if node.op_type not in convert_map:
            raise UnsupportedOpError(f"ONNX op {node.domain or 'ai.onnx'}::{node.op_type} has no TVM converter",
                                     culprit=node.name or node.output[0])


def specialize_onnx(proto: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """Fix the named inputs' dims (none when ``shapes`` is empty) and fold what became constant (shape arithmetic,
    casts of constants).

    TVM's ONNX frontend fails on much of the shape arithmetic exporters emit for dynamic dims (``Shape`` feeding
    ``Pad``/``Reshape``/``Range``, float64 scalars from ``Shape``); with static inputs onnxscript's optimizer folds
    all of it to constants first. Names of inputs and outputs are kept.
    """
    import onnx_ir as ir
    import onnxscript

    model = ir.from_proto(proto)
    for value in model.graph.inputs:
        if value.name in shapes:
            value.shape = ir.Shape([int(d) for d in shapes[value.name]])
    try:
        onnxscript.optimizer.optimize(model, num_iterations=2)
        # onnxscript keeps every ConstantOfShape (folding one can grow a model); the classic exporter builds the
        # attention mask's broadcast shape with small ones (Shape -> ConstantOfShape -> Where -> Expand), and TVM's
        # frontend cannot import an Expand whose shape stays computed.  Fold those that make few elements.
        onnxscript.optimizer.fold_constants(model, should_fold=_fold_small_constant_of_shape)
        onnxscript.optimizer.optimize(model, num_iterations=2)
    except Exception as exc:  # noqa: BLE001 - folding is an optimisation; import the unfolded graph then
        log.warning("constant folding for fixed shapes failed (%s); importing unfolded", exc)
        return proto
    return ir.to_proto(model)


#: ConstantOfShape nodes making at most this many elements are folded when their shape is a constant.
SMALL_CONSTANT_ELEMENTS = 4096


def _fold_small_constant_of_shape(node) -> bool | None:
    """``should_fold`` for onnxscript: True for a ConstantOfShape of a constant shape with few elements, else the
    optimizer's default (None)."""
    import math

    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
    if shape is None:
        return None
    dims = [int(d) for d in shape.numpy().reshape(-1)]
    return True if all(d >= 0 for d in dims) and math.prod(dims) <= SMALL_CONSTANT_ELEMENTS else None


def _set_input_dims(proto: onnx.ModelProto, shapes: dict) -> None:
    """Write ``shapes`` ({input name: dims}, see :mod:`targets.shape_ranges`) into the graph inputs of ``proto``
    (in place): an int fixes the dim, and every other input dim the model names with the same symbol (an
    ``attention_mask`` sharing ``batch`` with ``input_ids``); a ``(lo, hi)`` range keeps it symbolic, named
    ``<input>_<axis>`` where the model left it unnamed (a fixed model dim stays fixed: the range is refused after
    import). Two different values for one symbol raise :class:`InputError`."""
    from .errors import InputError
    from .shape_ranges import is_range

    fixed: dict[str, tuple[int, str]] = {}  # symbol -> (value, "input dim axis" that fixed it)
    for vi in proto.graph.input:
        for axis, (dim, want) in enumerate(zip(vi.type.tensor_type.shape.dim, shapes.get(vi.name, []))):
            if is_range(want) or not dim.dim_param:
                continue
            previous = fixed.setdefault(dim.dim_param, (int(want), f"{vi.name} dim {axis}"))
            if previous[0] != int(want):
                raise InputError(f"--shape {vi.name}: dim {axis} ({dim.dim_param!r}) fixed at {want}, but "
                                 f"{previous[1]} fixes it at {previous[0]}", culprit=vi.name)
    for vi in proto.graph.input:
        wanted = shapes.get(vi.name)
        if wanted is not None and len(vi.type.tensor_type.shape.dim) != len(wanted):
            vi.type.tensor_type.shape.Clear()  # unknown rank in the model: the given dims define it
            for _ in wanted:
                vi.type.tensor_type.shape.dim.add()
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            want = wanted[axis] if wanted is not None else None
            if want is not None and not is_range(want):
                dim.Clear()
                dim.dim_value = int(want)
            elif dim.dim_param and dim.dim_param in fixed:
                value = fixed[dim.dim_param][0]
                if want is not None:  # a range on a dim another input fixes
                    raise InputError(f"--shape {vi.name}: dim {axis} ({dim.dim_param!r}) given a range, but "
                                     f"{fixed[dim.dim_param][1]} fixes it at {value}", culprit=vi.name)
                dim.Clear()
                dim.dim_value = value
            elif want is not None and not dim.HasField("dim_value") and not dim.dim_param:
                dim.dim_param = f"{vi.name}_{axis}"


def import_onnx(model, shapes: dict | None = None) -> Imported:
    """ONNX path, ModelProto or onnx_ir Model -> :class:`Imported` (attention expanded, dropout removed; see
    onnx_normalize).

    ``shapes`` ({input name: [dims]}) fixes symbolic input dims given as ints; dims given as ``(lo, hi)`` ranges
    (:mod:`targets.shape_ranges`) and dims not given stay symbolic where TVM allows.
    """
    from tvm.relax.frontend.onnx import from_onnx

    proto = normalize_onnx(load_onnx(model))
    if shapes:
        init_names = {i.name for i in proto.graph.initializer}
        unknown = set(shapes) - {vi.name for vi in proto.graph.input if vi.name not in init_names}
        if unknown:
            raise LoweringLoadError(f"shapes given for unknown inputs {sorted(unknown)}", culprit=sorted(unknown)[0])
        _set_input_dims(proto, shapes)
    # fold what the fixed dims (or, without them, the graph alone) make constant: with symbolic dims this still
    # removes the exporters' shape arithmetic that TVM's frontend cannot import
    proto = specialize_onnx(proto, {})
    _check_supported(proto)
    init_names = {i.name for i in proto.graph.initializer}
    graph_inputs = [vi for vi in proto.graph.input if vi.name not in init_names]
    inputs = _onnx_io(graph_inputs, None)
    outputs = _onnx_io(proto.graph.output, None)
    printed = io.StringIO()  # the frontend prints its failing operator to stdout: kept for the debug log only
    failure = None
    with _native_stderr_to_log():
        try:
            with contextlib.redirect_stdout(printed), onnx_converters.overrides():
                mod = from_onnx(proto, keep_params_in_input=False)  # the input dims are in the proto
        except Exception as exc:  # noqa: BLE001 - frontend errors are wrapped, never leaked raw
            failure = (type(exc).__name__, str(exc), _culprit_onnx(proto, exc))
            # the frames of the failed conversion hold a Relax BlockBuilder whose C++ destructor prints a warning
            # to stderr: let it go while stderr is captured, not after softswap printed its one-line error
            del exc
            gc.collect()
    if printed.getvalue().strip():
        log.debug("TVM ONNX frontend output: %s", printed.getvalue().strip())
    if failure is not None:
        name, text, culprit = failure
        first = (text.strip().splitlines() or [""])[0]
        symbolic = [i for i in inputs if any(not isinstance(d, int) for d in i["shape"])]
        hint = ""
        if symbolic and not shapes:
            dims = ", ".join(f"{i['name']} {i['shape']}" for i in symbolic)
            hint = (f"; this graph has symbolic input dims ({dims}), which TVM's frontend cannot always import: "
                    "fix them with " + " ".join(f"--shape {i['name']}=..." for i in symbolic))
        raise ImportFailedError(f"TVM ONNX frontend failed: {name}: {first[:300]}{hint}", culprit=culprit)
    # output shapes may be unknown in the proto: take them from the Relax signature
    _fill_output_shapes(mod, outputs)
    return Imported(mod, inputs, outputs, "onnx")


@contextlib.contextmanager
def _native_stderr_to_log():
    """Send what native code writes to file descriptor 2 (TVM's C++ warnings) to the debug log while inside."""
    import tempfile

    sys_stderr_fd = 2
    try:
        saved = os.dup(sys_stderr_fd)
    except OSError:  # no usable stderr: nothing to capture
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), sys_stderr_fd)
        try:
            yield
        finally:
            os.dup2(saved, sys_stderr_fd)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("native stderr during ONNX import: %s", text[-2000:])


def _culprit_onnx(proto: onnx.ModelProto, exc: Exception) -> str:
    """Name of the first node whose op type the frontend error mentions (else the graph name)."""
    msg = str(exc)
    for node in proto.graph.node:
        if node.op_type in msg:
            return node.name or node.output[0]
    return proto.graph.name or "onnx graph"


def _fill_output_shapes(mod, outputs: list[dict]) -> None:
    from tvm import relax

    ret = getattr(mod["main"], "ret_ty", None)
    tuple_ty = getattr(relax, "TupleType", None)
    tys = list(ret.fields) if tuple_ty is not None and isinstance(ret, tuple_ty) else [ret]
    if len(tys) != len(outputs):
        return
    for o, ty in zip(outputs, tys):
        if isinstance(ty, relax.TensorType) and ty.shape is not None:
            try:
                o["shape"] = [int(d) for d in ty.shape.values]
            except (TypeError, AttributeError):
                pass
            o["dtype"] = str(ty.dtype)


def import_exported_program(ep, output_names: list[str] | None = None, shapes: dict | None = None) -> Imported:
    """torch.export ExportedProgram -> :class:`Imported` (SDPA normalized; see torch_normalize).  ``shapes``
    ({input name: dims}) re-exports the program at those shapes (its dims must be dynamic there)."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    from .torch_normalize import normalize_exported_program

    unknown = sorted(set(shapes or {}) - set(ep.graph_signature.user_inputs))
    if unknown:
        raise LoweringLoadError(f"--shape names no input of the program: {unknown[0]!r} (inputs: "
                             f"{', '.join(ep.graph_signature.user_inputs)})", culprit=unknown[0])
    try:
        ep = normalize_exported_program(ep, shapes)
    except Exception as exc:  # noqa: BLE001 - torch.export's errors are many lines; keep the first
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportFailedError(f"re-exporting the program{' at the given shapes' if shapes else ''} failed: "
                                f"{type(exc).__name__}: {first[:300]}", culprit=",".join(sorted(shapes or {}))
                                or "torch.export") from exc
    for node in ep.graph.nodes:  # ops the torch frontend cannot lower: fail early, naming the node
        op = getattr(node.target, "__name__", "").split(".")[0] if node.op == "call_function" else ""
        if op in UNSUPPORTED_ATEN:
            raise UnsupportedOpError(f"ATen op {op} is not supported by TVM's torch frontend", culprit=node.name)
    user = list(ep.graph_signature.user_inputs)
    inputs = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta["val"]
            inputs.append({"name": node.name, "shape": [int(d) if str(d).isdigit() else str(d) for d in val.shape],
                           "dtype": str(val.dtype).replace("torch.", "")})
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in out_node.args[0]]
    outputs = []
    for i, v in enumerate(vals):
        name = output_names[i] if output_names and i < len(output_names) else f"output_{i}"
        outputs.append({"name": name, "shape": [int(d) for d in v.shape] if v is not None else [],
                        "dtype": str(v.dtype).replace("torch.", "") if v is not None else "float32"})
    try:
        mod = from_exported_program(ep, keep_params_as_input=False)
    except Exception as exc:  # noqa: BLE001
        culprit = _first_unsupported_fx(ep, exc)
        raise ImportFailedError(f"TVM torch frontend failed: {type(exc).__name__}: {str(exc)[:500]}",
                                culprit=culprit) from exc
    return Imported(mod, inputs, outputs, "torch")


def _first_unsupported_fx(ep, exc) -> str:
    """Name of the first FX node whose ATen op the frontend error mentions (else "exported program")."""
    msg = str(exc)
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if op and op in msg:
            return node.name
    return "exported program"


def import_model(model, shapes: dict | None = None, example_inputs: tuple | None = None,
                 output_names: list[str] | None = None) -> Imported:
    """Dispatch on the model kind: .onnx path / ModelProto / ExportedProgram / nn.Module (+ example_inputs).
    ``output_names`` names the outputs of a torch program (ONNX models carry their own)."""
    import onnx_ir as ir

    if isinstance(model, (str, os.PathLike, onnx.ModelProto, ir.Model)):
        return import_onnx(model, shapes)
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(model, torch.export.ExportedProgram):
        from .shape_ranges import fixed_only, has_ranges, is_range
        if has_ranges(shapes) and any(not is_range(d) for dims in shapes.values() for d in dims):
            raise LoweringLoadError("a torch program takes either fixed --shape dims (re-exported at them) or "
                                    "ranges (its dims kept symbolic), not both; export it to ONNX to mix them",
                                    culprit=",".join(sorted(shapes)))
        return import_exported_program(model, output_names, fixed_only(shapes))
    if torch is not None and isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise LoweringLoadError("an nn.Module needs example_inputs", culprit=type(model).__name__)
        return import_exported_program(torch.export.export(model.eval(), tuple(example_inputs)))
    raise LoweringLoadError(f"unsupported model object of type {type(model).__name__}", culprit=type(model).__name__)
