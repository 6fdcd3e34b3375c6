"""CUDA: cumulative sums over a non-last axis of a tensor with run-time dims, as a serial scan per (outer, inner).

TVM 0.27 dispatches ``relax.cumsum`` on CUDA to ``topi.gpu.cumsum`` (a transposed parallel scan) unless the axis
is the last one; with a run-time extent before the scanned axis that kernel fails to lower
(``CompactBufferAllocation``: "Find divide by zero"; the prefix-sum form of causal linear attention, ``cumsum`` over
the length axis of ``(batch, heads, n, d, dv)``, hits it).  :func:`RouteSymbolicCumsum` rewrites such calls, before
TVM's ``DispatchSortScan``, to ``reshape (outer, n, inner) -> call_tir(gpu_3d_axis_1_cumsum) -> reshape back``:
TVM's own kernel in which each thread scans the middle axis of one (outer, inner) pair sequentially (threads
adjacent along ``inner``, so loads and stores coalesce).  Static shapes and last-axis scans are left to TVM.

Contract: only non-exclusive ``relax.cumsum`` with an axis and a known rank whose shape has a run-time dim is
rewritten; the result equals ``np.cumsum`` along that axis (accumulated in the output dtype).
"""

from __future__ import annotations

import logging
from functools import reduce
from operator import mul

from . import _env  # noqa: F401
import tvm
from tvm import relax

from .relax_util import rewrite_functions, routing_pass

log = logging.getLogger(__name__)


def _symbolic(shape) -> bool:
    return any(not isinstance(d, tvm.tirx.IntImm) for d in shape)


@relax.expr_functor.mutator
class _CumsumRouter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.kernels: dict = {}
        self.routed = 0

    def visit_call_(self, call):  # noqa: D401
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.cumsum":
            return call
        ty = call.ty
        if call.attrs.axis is None or int(call.attrs.exclusive) != 0 or not isinstance(ty, relax.TensorType) \
                or ty.shape is None:
            return call
        dims = list(getattr(ty.shape, "values", None) or [])
        if not dims or not _symbolic(dims):
            return call
        axis = int(call.attrs.axis)
        axis += len(dims) if axis < 0 else 0
        if axis == len(dims) - 1:
            return call  # TVM's own continuous-scan kernel handles the last axis
        from tvm.relax.backend.gpu_generic import gpu_3d_axis_1_cumsum

        in_dtype = call.args[0].ty.dtype
        out_dtype = str(call.attrs.dtype or "") or in_dtype
        key = (in_dtype, out_dtype)
        if key not in self.kernels:
            name = f"cumsum_axis1_{in_dtype}_{out_dtype}"
            self.kernels[key] = self.builder_.add_func(gpu_3d_axis_1_cumsum(in_dtype=in_dtype,
                                                                            out_dtype=out_dtype), name)
        one = tvm.tirx.const(1, "int64")
        outer = reduce(mul, dims[:axis], one)
        inner = reduce(mul, dims[axis + 1:], one)
        shape3 = relax.ShapeExpr([outer, dims[axis], inner])
        x3 = self.builder_.emit(relax.op.reshape(call.args[0], shape3))
        y3 = self.builder_.emit(relax.call_tir(self.kernels[key], [x3], relax.TensorType(shape3, out_dtype)))
        self.routed += 1
        return relax.op.reshape(y3, ty.shape)

    def run(self) -> tvm.IRModule:
        return rewrite_functions(self)


def RouteSymbolicCumsum():  # noqa: N802 - pass constructor naming, like TVM's
    """Module pass: non-last-axis ``relax.cumsum`` with run-time dims -> TVM's serial axis-1 scan kernel (see the
    module docstring); logs how many calls it rewrote."""
    return routing_pass("RouteSymbolicCumsum", _CumsumRouter,
                        "routed %d cumsum call(s) with run-time dims to the serial-scan CUDA kernel", logger=log)
