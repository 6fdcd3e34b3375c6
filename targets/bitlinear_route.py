"""Relax pass routing binary (W1A1) linears to the bit-packed kernels of :mod:`targets.bitlinear`.

The pattern (the contract between the BiViT pass and this kernel), as TVM's ONNX and torch importers write it::

    c = greater_equal(x, 0)                 # x: float32 (..., K), K static; 0 a scalar or all-zero constant
    s = where(c, 1, -1)                     # 1 / -1: float32 constants (scalars or broadcast tensors), maybe bound
    s' = reshape(s, ...)                    # zero or more reshape / expand_dims / squeeze (torch: (B, T, K) -> (BT, K))
    y = matmul(s', B)                       # B: a float32 constant (K, N), or permute_dims(constant (N, K)); every
                                            # entry exactly +1 or -1

becomes ``reshape(x, (M, K)) -> call_tir(pack) -> call_tir(bgemm, packed constant) [-> strided_slice] -> reshape``
with the weight packed here, at compile time.  The ``where`` / ``greater_equal`` bindings are removed by dead-code
elimination when nothing else reads them.  What follows (the α multiply, the bias) is left as it is.

Leading dims may be symbolic (a dynamic batch): the kernels then take the row count at run time.  A matmul whose
left operand is such a sign but whose weight is not a constant, not exactly ±1, not 2-D, or whose feature dim is
not static is left alone, and the reason is logged at debug level.  The kernels are generic TIR; LLVM
picks the instructions of the target (``vpopcntq`` only where the target has AVX512-VPOPCNTDQ), so the routed
module runs wherever the unrouted one does.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from . import _env  # noqa: F401
import numpy as np
import tvm
from tvm import relax
from tvm.sym.analyzer import Analyzer

from .relax_util import dim_product, op_name, rewrite_functions, routing_pass, tensor_const
from .bitlinear import (MAX_INPUTS, choose_bit_kernel, make_bgemm_kernel, make_pack_kernel, pack_weights,
                        padded_outputs, words_of)

log = logging.getLogger(__name__)

#: Ops between the sign and the matmul that keep the elements' row-major order.
_ORDER_KEEPING = frozenset({"relax.reshape", "relax.expand_dims", "relax.squeeze"})
#: Longest chain of bindings followed from a matmul operand back to its definition.
_MAX_WALK = 32
#: Row count assumed when choosing a schedule for a symbolic one.
_DYNAMIC_ROWS = 1 << 20


@dataclasses.dataclass(frozen=True)
class BinaryLinear:
    """A matched binary linear: ``y = sign(x) @ w`` with ``w`` (k, n) ±1; ``x`` is the Var (of the original
    function) whose signs are taken; ``m`` rows (an int, or a TIR expression of the function's symbolic dims) of
    ``k`` inputs; ``out_shape`` the matmul's output dims (ints or expressions)."""

    x: relax.Expr
    w: np.ndarray
    m: object
    k: int
    n: int
    out_shape: tuple

    @property
    def dynamic(self) -> bool:
        """True when the row count is symbolic (e.g. a dynamic batch)."""
        return not isinstance(self.m, int)


def _resolve(expr, var2val: dict):
    """Follow variable bindings to the bound value (at most ``_MAX_WALK`` steps)."""
    for _ in range(_MAX_WALK):
        if isinstance(expr, tvm.ir.Var) and expr in var2val:
            expr = var2val[expr]
        else:
            break
    return expr


def _const(expr, var2val: dict) -> np.ndarray | None:
    return tensor_const(_resolve(expr, var2val))


def _is_const_all(expr, var2val: dict, target: float) -> bool:
    arr = _const(expr, var2val)
    return arr is not None and arr.dtype == np.float32 and arr.size > 0 and bool(np.all(arr == target))


def _dims(ty) -> tuple | None:
    """A tensor type's dims: ints where static, TIR expressions where symbolic; None when the shape is unknown."""
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in ty.shape.values)


def _dtype(ty) -> str:
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else ""


def sign_source(expr, var2val: dict):
    """The ``x`` of ``where(greater_equal(x, 0), 1, -1)`` reached from ``expr`` through order-keeping reshapes, or
    None when ``expr`` is not such a sign."""
    value = _resolve(expr, var2val)
    for _ in range(_MAX_WALK):
        if op_name(value) not in _ORDER_KEEPING:
            break
        value = _resolve(value.args[0], var2val)
    if op_name(value) != "relax.where":
        return None
    cond, pos, neg = value.args
    if not (_is_const_all(pos, var2val, 1.0) and _is_const_all(neg, var2val, -1.0)):
        return None
    cond = _resolve(cond, var2val)
    if op_name(cond) != "relax.greater_equal" or not _is_const_all(cond.args[1], var2val, 0.0):
        return None
    return cond.args[0]


def _weight(expr, var2val: dict) -> tuple[np.ndarray | None, str]:
    """The (k, n) right operand as an array, or (None, why not)."""
    value = _resolve(expr, var2val)
    w = tensor_const(value)
    if w is not None:
        return (w, "") if w.ndim == 2 else (None, f"weight is {w.ndim}-D, not 2-D")
    if op_name(value) == "relax.permute_dims":
        inner = _const(value.args[0], var2val)
        if inner is None:
            return None, "weight is a transpose of a non-constant"
        axes = value.attrs.axes
        if inner.ndim != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
            return None, "weight is a permutation other than a 2-D transpose"
        return inner.T, ""
    return None, "weight is not a constant"


def match_binary_linear(call: relax.Call, var2val: dict) -> BinaryLinear | str | None:
    """``call`` (a ``relax.matmul`` of the original function) as a :class:`BinaryLinear`; a string saying why not
    when its left operand is a sign but the rest does not fit; None when the left operand is not a sign."""
    if op_name(call) != "relax.matmul":
        return None
    x = sign_source(call.args[0], var2val)
    if x is None:
        return None
    w, why = _weight(call.args[1], var2val)
    if w is None:
        return why
    if w.dtype != np.float32:
        return f"weight dtype is {w.dtype}, not float32"
    bad = np.argwhere(np.abs(w) != 1.0)
    if bad.size:
        i, j = (int(v) for v in bad[0])
        return (f"weight has {len(bad)} of {w.size} entries other than ±1 (e.g. {float(w[i, j])!r} at [{i}, {j}] of "
                "(in, out))")
    x_shape, lhs_shape, out_shape = _dims(x.ty), _dims(call.args[0].ty), _dims(call.ty)
    if x_shape is None or lhs_shape is None or out_shape is None:
        return "shapes are unknown"
    if _dtype(x.ty) != "float32" or _dtype(call.ty) != "float32":
        return f"dtypes {_dtype(x.ty)} -> {_dtype(call.ty)}, not float32"
    k, n = (int(d) for d in w.shape)
    if not lhs_shape or not isinstance(lhs_shape[-1], int) or lhs_shape[-1] != k:
        return f"left operand shape {list(lhs_shape)} does not end in {k} (the features must be static)"
    if k >= MAX_INPUTS:
        return f"{k} inputs: the ±1 dot product is not exact in float32"
    m = dim_product(lhs_shape[:-1])
    if isinstance(m, int):
        if not all(isinstance(d, int) for d in x_shape) or math.prod(x_shape) != m * k:
            return f"sign input {list(x_shape)} does not flatten to ({m}, {k})"
        if m == 0 or n == 0:
            return "empty product"
    elif not Analyzer().can_prove_equal(dim_product(x_shape), m * k):
        return f"sign input {list(x_shape)} does not provably flatten to ({m}, {k})"
    return BinaryLinear(x, np.ascontiguousarray(w), m, k, n, out_shape)


@relax.expr_functor.mutator
class _BitLinearRouter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        from .softmax_kernels import vector_bits_of

        self.mod_ = mod
        self.bits = vector_bits_of(target)
        self.var2val: dict = {}
        self.kernels: dict = {}
        self.routed = 0
        self.skipped: list[str] = []

    def _kernel(self, key, name: str, make):
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(make().with_attr("global_symbol", name), name)
        return self.kernels[key]

    def visit_call_(self, call):  # noqa: D401
        match = match_binary_linear(call, self.var2val)
        new = super().visit_call_(call)
        if match is None:
            return new
        if isinstance(match, str):
            log.debug("binary linear left to TVM's matmul: %s", match)
            self.skipped.append(match)
            return new
        b = match
        rows = None if b.dynamic else b.m  # None: the kernels take a symbolic row count
        ch = choose_bit_kernel(_DYNAMIC_ROWS if rows is None else rows, b.n, self.bits)
        npad, kw = padded_outputs(b.n, ch), words_of(b.k)
        tag = "dyn" if rows is None else str(rows)
        pack = self._kernel(("pack", rows, b.k), f"bitlinear_pack_{tag}x{b.k}",
                            lambda: make_pack_kernel(rows, b.k, self.bits))
        gemm = self._kernel(("gemm", rows, b.k, b.n, ch), f"bitlinear_gemm_{tag}x{b.k}x{b.n}",
                            lambda: make_bgemm_kernel(rows, b.k, b.n, ch))
        x2 = self.builder_.emit(relax.op.reshape(self.visit_expr(b.x), (b.m, b.k)))
        xp = self.builder_.emit(relax.call_tir(pack, [x2], relax.TensorType((b.m, kw), "uint64")))
        y = self.builder_.emit(relax.call_tir(gemm, [xp, relax.const(pack_weights(b.w, ch.panel))],
                                              relax.TensorType((b.m, npad), "float32")))
        if npad != b.n:
            y = self.builder_.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[b.n]))
        self.routed += 1
        log.debug("binary linear (%s x %d) @ (%d x %d) routed to the bit-packed kernel %s", b.m, b.k, b.k, b.n, ch)
        if not b.dynamic and tuple(b.out_shape) == (b.m, b.n):
            return y
        return relax.op.reshape(y, b.out_shape)

    def run(self) -> tvm.IRModule:
        def read(func: relax.Function) -> None:
            self.var2val = dict(relax.analysis.get_var2val(func))

        return rewrite_functions(self, read)


def RouteBitLinear(target: tvm.target.Target):  # noqa: N802 - pass constructor naming, like TVM's
    """Module pass replacing binary linears by the bit-packed kernels (module docstring); the signs and float
    weights they no longer need are removed."""

    def report_skipped(router: _BitLinearRouter) -> None:
        if router.skipped:
            reasons = sorted({r.split(" (")[0] for r in router.skipped})
            log.info("%d sign-input matmul(s) left to TVM's matmul: %s", len(router.skipped), "; ".join(reasons))

    return routing_pass("RouteBitLinear", lambda mod: _BitLinearRouter(mod, target),
                        "routed %d binary linear(s) to bit-packed kernels", drop_dead_code=True,
                        report=report_skipped, logger=log)
