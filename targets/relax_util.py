"""Small readers of Relax IR shared by the routing passes (attention, binary linear, softmax).

Each helper answers one question about an expression and never raises on an expression of another kind: it
returns a neutral value ("" / None) instead, so a pattern check can chain them.
"""
from __future__ import annotations

from . import _env  # noqa: F401
import numpy as np
import tvm


def op_name(expr) -> str:
    """The operator name of a call to a Relax op (``"relax.matmul"``), "" for anything else."""
    return expr.op.name if isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op) else ""


def tensor_const(value) -> np.ndarray | None:
    """The array of a Relax tensor constant (``tvm.ir.GenericConst`` in TVM 0.27), else None."""
    if not isinstance(value, tvm.ir.GenericConst):
        return None
    data = value.value
    return data.numpy() if isinstance(data, tvm.runtime.Tensor) else None


def dim_product(dims):
    """Product of tensor dims: an int when every dim is an int, else a TIR expression (symbolic extents)."""
    out = 1
    for d in dims:
        out = out * d
    return out
