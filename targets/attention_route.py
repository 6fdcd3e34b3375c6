"""Relax pattern: ``matmul(softmax(matmul(A, B) [·scale] [+ mask]), V)`` -> one fused attention kernel.

Matched chain (both importers' shapes): ``S = matmul(A, B)`` with ``A (L..., N, D)``, ``B (L..., D, M)``; optionally
``S * c`` / ``c * S`` / ``S / c`` with ``c`` a scalar float32 constant; optionally ``+ mask`` (either operand order)
with a float32 mask broadcastable to ``(L..., N, M)``; ``softmax(axis=-1)``; ``matmul(P, V)`` with
``V (L..., M, DV)``; the SDPA exporters' NaN guard ``where(isnan(P), 0, P)`` between softmax and the second matmul
is accepted (a no-op: neither path produces NaN).  Every intermediate must have exactly one use (a graph that also
returns the probabilities is left alone), all shapes static, float32, leading dims of the same total size on every
operand (no broadcast batch).  Single-use ``reshape``s that keep the last two dims and identity ``broadcast_to``s
around the matmuls (the torch frontend's batched-matmul wrapping) are stepped through.
What feeds ``A`` and ``B`` (head split, ``permute_dims`` of K, ``sqrt(scale)`` multiplies) stays in the graph:
those are O(N·D) elementwise ops the default rules schedule.

The chain becomes ``reshape -> call_tir(targets.attention_kernel) -> reshape``; the dead matmuls/softmax are
removed.  Anything else (symbolic N, a bool ``where`` mask, a value width not a multiple of 4, a different op
order) keeps the unfused path (the routed softmax kernel between two scheduled matmuls); the pass logs how many
blocks it fused and, at debug level, why a candidate was skipped.
"""

from __future__ import annotations

import logging

from . import _env  # noqa: F401
import tvm
from tvm import relax

from .attention_kernel import AttentionShape, MaskLayout, make_attention_kernel, supported
from .bitlinear_route import _tensor_const

log = logging.getLogger(__name__)


def _shape(expr) -> list[int] | None:
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None or sinfo.dtype != "float32":
        return None
    try:
        return [int(d) for d in sinfo.shape.values]
    except (TypeError, AttributeError):
        return None


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


@relax.expr_functor.visitor
class _UseCounter(relax.PyExprVisitor):
    def __init__(self):
        super().__init__()
        self.uses: dict = {}

    def visit_var_(self, var):  # noqa: D401
        self.uses[var] = self.uses.get(var, 0) + 1

    def visit_dataflow_var_(self, var):  # noqa: D401
        self.uses[var] = self.uses.get(var, 0) + 1


def _mask_layout(mshape: list[int], score: list[int]) -> MaskLayout | None:
    """Strides of a mask broadcast to the score shape, or None when it does not broadcast."""
    if len(mshape) > len(score):
        return None
    full = [1] * (len(score) - len(mshape)) + list(mshape)
    strides, acc = [0] * len(full), 1
    for ax in range(len(full) - 1, -1, -1):
        if full[ax] not in (1, score[ax]):
            return None
        strides[ax] = acc if full[ax] != 1 else 0
        acc *= full[ax]
    return MaskLayout(tuple(score[:-2]), tuple(strides[:-2]), strides[-2], strides[-1], acc)


@relax.expr_functor.mutator
class _AttentionRouter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int):
        super().__init__(mod)
        self.mod_ = mod
        self.lanes = lanes
        self.kernels: dict = {}
        self.routed = 0
        self.var2val: dict = {}
        self.uses: dict = {}

    # -- chain matching on the original function ---------------------------------------------------------------
    def _value(self, expr, single_use: bool = True):
        if not isinstance(expr, relax.Var) or expr not in self.var2val:
            return None
        if single_use and self.uses.get(expr, 0) != 1:
            return None
        return self.var2val[expr]

    def _peel(self, expr):
        """Step through single-use ``reshape``s that only merge/split leading dims (last two kept) and identity
        ``broadcast_to``s: the torch frontend wraps batched matmuls in them."""
        while True:
            val = self._value(expr)
            if not (_op(val, "relax.reshape") or _op(val, "relax.broadcast_to")):
                return expr
            src, dst = _shape(val.args[0]), _shape(val)
            if src is None or dst is None or len(src) < 2 or len(dst) < 2 or src[-2:] != dst[-2:]:
                return expr
            if _op(val, "relax.broadcast_to") and src != dst:
                return expr
            if _prod(src) != _prod(dst):
                return expr
            expr = val.args[0]

    def _nan_guarded(self, expr):
        """``P`` when ``expr = where(isnan(P), 0, P)`` (the SDPA exporters' guard for fully masked rows) and ``P``
        has no other use, else None.  The fused kernel, like the routed softmax kernel of the unfused path, never
        produces NaN (a fully masked row is uniform), so the guard is a no-op on both paths."""
        val = self._value(expr)
        if not _op(val, "relax.where"):
            return None
        cond, zero, p = val.args
        test = self._value(cond)
        if not _op(test, "relax.isnan") or not test.args[0].same_as(p) or self._scalar(zero) != 0.0:
            return None
        return p if self.uses.get(p, 0) == 2 else None

    def _scalar(self, expr) -> float | None:
        if isinstance(expr, relax.Var):
            expr = self.var2val.get(expr)
        data = _tensor_const(expr)
        if data is None or data.dtype != "float32" or data.size != 1:
            return None
        return float(data.reshape(-1)[0])

    def _match(self, call):
        """``(A, B, V, mask, scale)`` of the chain ending in ``call`` (a matmul), or None."""
        p, vv = call.args
        p = self._peel(p)
        guarded = self._nan_guarded(p)
        sm = self._value(guarded, single_use=False) if guarded is not None else self._value(p)
        if not _op(sm, "relax.nn.softmax"):
            return None
        score = _shape(sm)
        if score is None or len(score) < 2 or int(sm.attrs.axis) not in (-1, len(score) - 1):
            return None
        x, mask, scale = sm.args[0], None, 1.0
        val = self._value(x)
        if _op(val, "relax.add"):
            for chain, other in ((val.args[0], val.args[1]), (val.args[1], val.args[0])):
                inner = self._value(chain)
                if _op(self._value(self._peel(chain)), "relax.matmul"):
                    inner = self._value(self._peel(chain))
                if _op(inner, "relax.matmul") or _op(inner, "relax.multiply") or _op(inner, "relax.divide"):
                    x, mask, val = chain, other, inner
                    break
            else:
                return None
        if _op(val, "relax.multiply") or _op(val, "relax.divide"):
            a0, a1 = val.args
            c = self._scalar(a1)
            if c is not None:
                x = a0
            elif _op(val, "relax.multiply") and self._scalar(a0) is not None:
                c, x = self._scalar(a0), a1
            else:
                return None
            if c == 0.0 and _op(val, "relax.divide"):
                return None
            scale = c if _op(val, "relax.multiply") else 1.0 / c
            val = self._value(x)
        if not _op(val, "relax.matmul"):
            val = self._value(self._peel(x))
        if not _op(val, "relax.matmul"):
            return None
        return val.args[0], val.args[1], vv, mask, scale, score

    def visit_call_(self, call):  # noqa: D401
        if not _op(call, "relax.matmul"):
            return super().visit_call_(call)
        m = self._match(call)
        if m is None:
            return super().visit_call_(call)
        a, b, vv, mask, scale, score = m
        sa, sb, sv, so = _shape(a), _shape(b), _shape(vv), _shape(call)
        lead = score[:-2]
        if None in (sa, sb, sv, so) or any(len(s) < 2 or _prod(s[:-2]) != _prod(lead) for s in (sa, sb, sv, so)):
            log.debug("attention chain not fused: operand shapes %s %s %s vs scores %s", sa, sb, sv, score)
            return super().visit_call_(call)
        n, d, mm, dv = sa[-2], sa[-1], sb[-1], sv[-1]
        if sb[-2] != d or sv[-2] != mm or score[-2:] != [n, mm]:
            return super().visit_call_(call)
        layout = None
        if mask is not None:
            ms = _shape(mask)
            layout = _mask_layout(ms, score) if ms is not None else None
            if layout is None:
                log.debug("attention chain not fused: mask shape %s does not broadcast to %s", ms, score)
                return super().visit_call_(call)
        bh = _prod(lead)
        shape = AttentionShape(bh, n, mm, d, dv, self.lanes, float(scale), layout)
        why = supported(shape)
        if why:
            log.debug("attention chain not fused: %s", why)
            return super().visit_call_(call)
        if shape not in self.kernels:
            name = f"attention_fused_{bh}x{n}x{mm}x{d}x{dv}" + ("_mask" if layout else "")
            f = make_attention_kernel(shape).with_attr("global_symbol", name)
            self.kernels[shape] = self.builder_.add_func(f, name)
        args = [self.builder_.emit(relax.op.reshape(self.visit_expr(a), (bh, n, d))),
                self.builder_.emit(relax.op.reshape(self.visit_expr(b), (bh, d, mm))),
                self.builder_.emit(relax.op.reshape(self.visit_expr(vv), (bh, mm, dv)))]
        if layout is not None:
            args.append(self.builder_.emit(relax.op.reshape(self.visit_expr(mask), (layout.size,))))
        out = self.builder_.emit(relax.call_tir(self.kernels[shape], args,
                                                relax.TensorType((bh, n, dv), "float32")))
        self.routed += 1
        return relax.op.reshape(out, so)

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.var2val = relax.analysis.get_var2val(func)
                counter = _UseCounter()
                counter.visit_expr(func)
                self.uses = counter.uses
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


def RouteAttention(target: tvm.target.Target):  # noqa: N802 - pass constructor naming, like TVM's
    """Module pass replacing static softmax-attention chains by the fused kernel (see module docstring); run it
    before softmax routing and fast math."""
    from .softmax_kernels import vector_bits_of

    lanes = 16 if vector_bits_of(target) >= 512 else 8

    @tvm.transform.module_pass(opt_level=0, name="RouteAttention")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        router = _AttentionRouter(mod, lanes)
        out = router.run()
        if router.routed:
            out = relax.transform.DeadCodeElimination()(out)
        log.info("fused %d softmax attention block(s) into hand kernels", router.routed)
        return out

    return _pass
