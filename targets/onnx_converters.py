"""Converter overrides for TVM's ONNX frontend, where its own converter loses what a symbolic-shape build needs.

Installed only for the duration of one import (:func:`overrides`), so TVM itself is never changed globally. The
frontend's converter table is module state, so the swap holds a lock: concurrent imports in threads run one at a
time instead of restoring each other's table out of order.

- ``Range`` with constant integer start/step and a symbolic limit (``Range(0, Shape(x)[1], 1)``, which every
  exporter writes for positions and masks): TVM's converter routes the length through a tensor and a fresh shape
  variable, so the result's length is no longer the input's dim and later broadcasts/reshapes against that dim
  lose their shape. Here it becomes ``arange(start, limit, step)`` whose length stays an expression of the input
  dims.
- ``Reshape`` of an integer the frontend holds as a PrimValue (the sum of two symbolic lengths): TVM's converter
  requires a tensor. Reshaped to one element (``[-1]``/``[1]``, a slice bound) it becomes a one-dim shape, so a
  ``Slice`` ending there keeps a symbolic output shape (as a runtime tensor the slice, and every shape read from
  it downstream, lost its dims: TorchScript-exported causal linear attention with separate query/key lengths);
  otherwise a 0-d int64 tensor.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

from . import _env  # noqa: F401
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _frontend

log = logging.getLogger(__name__)


def _int_constant(value) -> int | None:
    if isinstance(value, tvm.ir.GenericConst):
        array = value.value.numpy()
        if array.size == 1 and array.dtype.kind in "iu":
            return int(array.reshape(()))
    if isinstance(value, tvm.tirx.IntImm):
        return int(value.value)
    return None


def _prim_expr(value):
    """The integer expression a scalar stands for: a PrimExpr, or a Relax PrimValue holding one; else None."""
    if tvm.ir.is_prim_expr(value):
        return value
    if isinstance(getattr(value, "ty", None), tvm.ir.PrimType) and tvm.ir.is_prim_expr(getattr(value, "value", None)):
        return value.value  # a Relax PrimValue
    return None


def _is_integer(expr) -> bool:
    try:
        dtype = str(expr.dtype)
    except Exception:  # noqa: BLE001 - TVM 0.27's tir Var keeps its type in .ty
        dtype = str(getattr(expr, "ty", ""))
    return "int" in dtype


class SymbolicRange(_frontend.Range):
    """``Range(start, limit, delta)`` with integer constant start/delta and a symbolic integer limit."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        start = _int_constant(_frontend.get_constant(inputs[0], params))
        delta = _int_constant(_frontend.get_constant(inputs[2], params))
        limit = _prim_expr(_frontend.get_constant(inputs[1], params))
        if start is not None and delta is not None and delta != 0 and limit is not None \
                and _is_integer(limit):
            return relax.op.arange(start, limit, delta, "int64")
        return super()._impl_v12(bb, inputs, attr, params)


def _prim_to_tensor(bb, value):
    """A 0-d int64 tensor holding the integer a Relax PrimValue stands for; other values unchanged."""
    expr = _prim_expr(value)
    if expr is None or not _is_integer(expr):
        return value
    if str(getattr(expr, "dtype", "int64")) != "int64":
        expr = tvm.tirx.Cast("int64", expr)
    tensor = bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr([expr])))
    return bb.normalize(relax.op.reshape(tensor, ()))


class ScalarReshape(_frontend.Reshape):
    """``Reshape`` of a scalar the frontend keeps as a PrimValue (``Add(Squeeze(Shape(a)), Squeeze(Shape(b)))``,
    the sum of two symbolic lengths): the value becomes a 0-d tensor first."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        expr = _prim_expr(inputs[0])
        target = _frontend.get_constant(inputs[1], params)
        if expr is not None and _is_integer(expr) and isinstance(target, tvm.ir.GenericConst) \
                and target.value.numpy().reshape(-1).tolist() in ([-1], [1]):
            # a 1-element int64 vector: kept as a shape so Slice/Concat/Reshape consumers stay symbolic
            if str(getattr(expr, "dtype", "int64")) != "int64":
                expr = tvm.tirx.Cast("int64", expr)
            return relax.ShapeExpr([expr])
        return super()._impl_v13(bb, [_prim_to_tensor(bb, inputs[0]), *inputs[1:]], attr, params)


_OVERRIDES = {"Range": SymbolicRange, "Reshape": ScalarReshape}


#: Serializes :func:`overrides` across threads (re-entrant: a nested import in the same thread is fine).
_SWAP_LOCK = threading.RLock()


@contextlib.contextmanager
def overrides() -> Iterator[None]:
    """TVM's ONNX converter map with this module's converters in place, restored on exit (thread-safe)."""
    with _SWAP_LOCK:
        original = _frontend._get_convert_map

        def patched():
            table = dict(original())
            table.update(_OVERRIDES)
            return table

        _frontend._get_convert_map = patched
        try:
            yield
        finally:
            _frontend._get_convert_map = original
