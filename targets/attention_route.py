"""Relax pattern: ``matmul(softmax(matmul(A, B) [·scale] [+ mask]), V)`` -> one fused attention kernel.

Matched chain (both importers' shapes): ``S = matmul(A, B)`` with ``A (L..., N, D)``, ``B (L..., D, M)``; optionally
``S * c`` / ``c * S`` / ``S / c`` with ``c`` a scalar float32 constant; optionally ``+ mask`` (either operand order)
with a float32 mask broadcastable to ``(L..., N, M)``; ``softmax(axis=-1)``; ``matmul(P, V)`` with
``V (L..., M, DV)``; the SDPA exporters' NaN guard ``where(isnan(P), 0, P)`` between softmax and the second matmul
is accepted (a no-op: neither path produces NaN).  Every intermediate must have exactly one use (a graph that also
returns the probabilities is left alone), float32, leading dims of the same total size on every operand (no
broadcast batch).  Static shapes get a kernel built for them; shapes with run-time dims (batch, ``N``, ``M``) get
the run-time-shaped kernel (:func:`targets.attention_kernel.make_symbolic_attention_kernel`, one per head dims,
scale and mask layout) when the head dims ``D``/``DV`` and every leading dim but the first are static and the
mask provably broadcasts ((B, 1, 1, M) / (B, 1, N, M) / (1, 1, N, M) ...).  Single-use ``reshape``s that keep
the last two dims and identity ``broadcast_to``s around the matmuls (the torch frontend's batched-matmul wrapping)
are stepped through.
Around the kernel, the graph keeps no copy where the pattern proves it needless: single-use multiplies of ``A`` or
``B`` by a finite scalar constant (the SDPA exporters' ``sqrt(scale)`` on Q and K) are folded into the kernel's
scale (scores equal up to rounding, a few ulp); a ``B`` that is a single-use ``permute_dims`` swapping the last two
axes of ``K`` is replaced by ``K`` itself, which the kernel reads as key rows and transposes while it packs Kᵀ;
the kernel writes the caller's output shape (all leading dims, or all but a run-time first one), so no reshape
copy follows it.  The operands' reshapes to ``(BH, N, D)`` / ``(BH, M, D)`` / ``(BH, M, DV)`` become views
(``RewriteDataflowReshape``).  Anything else feeding ``A`` and ``B`` (head split, other elementwise ops) stays in
the graph for the default rules.

The chain becomes ``reshape (views) -> call_tir(targets.attention_kernel)``; the dead matmuls/softmax are
removed.  Anything else (a run-time head dim, a bool ``where`` mask, a value width not a multiple of 4, a different
op order) keeps the unfused path (the routed softmax kernel between two scheduled matmuls); the pass logs how many
blocks it fused and, at debug level, why a candidate was skipped.
"""

from __future__ import annotations

import logging
import math

from . import _env  # noqa: F401
import tvm
from tvm import relax
from tvm.sym.analyzer import Analyzer

from .attention_kernel import (AttentionShape, MaskLayout, SymbolicAttention, SymbolicMask, make_attention_kernel,
                               make_symbolic_attention_kernel, supported, value_lanes)
from .relax_util import dim_product, rewrite_functions, routing_pass, tensor_const

log = logging.getLogger(__name__)


def _shape(expr) -> list[int] | None:
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None or sinfo.dtype != "float32":
        return None
    try:
        return [int(d) for d in sinfo.shape.values]
    except (TypeError, AttributeError):
        return None


def _dims(expr) -> list | None:
    """The dims of a float32 tensor: ints where static, tirx expressions where symbolic; None when unknown."""
    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None or sinfo.dtype != "float32":
        return None
    values = getattr(sinfo.shape, "values", None)
    if values is None:
        return None
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in values]


_ANALYZER = Analyzer()


def _same(a, b) -> bool:
    """Whether two dims (ints or tirx expressions) are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return bool(_ANALYZER.can_prove_equal(tvm.tirx.const(a, "int64") if isinstance(a, int) else a,
                                          tvm.tirx.const(b, "int64") if isinstance(b, int) else b))


def _same_dims(a: list, b: list) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _chain_dims(a, b, vv, out, score: list) -> tuple[list, list, list, list] | str:
    """The dims of q (…, N, D), kᵀ (…, D, M), v (…, M, Dv) and the output of an attention chain whose scores have
    dims ``score`` (…, N, M), when every operand's leading dims multiply to the scores' and the inner dims chain
    (static ints or provably equal run-time extents); else the reason they do not."""
    dims = [_dims(x) for x in (a, b, vv, out)]
    lead = dim_product(score[:-2])
    if any(x is None or len(x) < 2 or not _same(dim_product(x[:-2]), lead) for x in dims):
        return f"operand shapes {dims[0]} {dims[1]} {dims[2]} vs scores {score}"
    da, db, dv_, _ = dims
    if not (_same(db[-2], da[-1]) and _same(dv_[-2], db[-1]) and _same_dims(score[-2:], [da[-2], db[-1]])):
        return f"inner dims do not chain: q {da}, k {db}, v {dv_}, scores {score}"
    return dims[0], dims[1], dims[2], dims[3]


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


def _symbolic_mask(mdims: list, score: list) -> SymbolicMask | None:
    """How a mask of dims ``mdims`` (ints / tirx expressions) broadcasts to the run-time score dims, or None when it
    does not provably broadcast or a group index would need a run-time extent (see :class:`SymbolicMask`)."""
    if len(mdims) > len(score):
        return None
    full = [1] * (len(score) - len(mdims)) + list(mdims)

    def bcast(x) -> bool:
        return isinstance(x, int) and x == 1

    for x, s in zip(full, score):
        if not (bcast(x) or _same(x, s)):
            return None
    lead, mlead = score[:-2], full[:-2]
    groups = []
    for ax, x in enumerate(mlead):
        if bcast(x):
            continue
        after = dim_product(lead[ax + 1:])
        stride = dim_product([y for y in mlead[ax + 1:] if not bcast(y)])
        extent = None if ax == 0 else lead[ax]
        if not all(isinstance(v, int) for v in (after, stride)) or not (extent is None or isinstance(extent, int)):
            return None
        groups.append((after, extent, stride))
    return SymbolicMask(tuple(groups), not bcast(full[-2]), not bcast(full[-1]))


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
            src, dst = _dims(val.args[0]), _dims(val)
            if src is None or dst is None or len(src) < 2 or len(dst) < 2 or not _same_dims(src[-2:], dst[-2:]):
                return expr
            if _op(val, "relax.broadcast_to") and not _same_dims(src, dst):
                return expr
            if not _same(dim_product(src), dim_product(dst)):
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
        data = tensor_const(expr)
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
        score = _dims(sm)
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
        a, ca = self._unscaled(val.args[0])
        b, cb = self._unscaled(val.args[1])
        keys = self._untransposed(b)
        ck = 1.0
        if keys is not None:
            keys, ck = self._unscaled(keys)
        return a, b, vv, mask, scale * ca * cb * ck, score, keys

    def _untransposed(self, expr):
        """``K`` (…, M, D) when ``expr`` (…, D, M) is (through :meth:`_peel`) a single-use ``permute_dims`` of ``K``
        that swaps only the last two axes (how every importer spells Kᵀ): the kernel then reads K's rows and
        transposes while it packs Kᵀ, and the graph's transpose copy disappears; else None."""
        val = self._value(self._peel(expr))
        if not _op(val, "relax.permute_dims") or val.attrs.axes is None:
            return None
        axes = [int(x) for x in val.attrs.axes]
        rank = len(axes)
        if rank < 3 or axes != list(range(rank - 2)) + [rank - 1, rank - 2]:
            return None
        src = self._peel(val.args[0])
        return src if _dims(src) is not None and len(_dims(src)) >= 2 else None

    def _unscaled(self, expr):
        """``(X, c)`` when ``expr`` is (through :meth:`_peel`) a single-use ``X * c`` / ``c * X`` with ``c`` a finite
        scalar float32 constant that does not change ``X``'s shape (the SDPA exporters' ``sqrt(scale)`` on Q and K):
        the scale moves into the kernel's score epilogue, ``(q·c1)·(k·c2) = (q·k)·(c1·c2)`` up to rounding (a few
        ulp of the scores), and the operand's multiply disappears from the graph; else ``(expr, 1.0)``."""
        val = self._value(self._peel(expr))
        if not _op(val, "relax.multiply"):
            return expr, 1.0
        for x, c in ((val.args[0], val.args[1]), (val.args[1], val.args[0])):
            k = self._scalar(c)
            dx, dv = _dims(x), _dims(val)
            if k is not None and math.isfinite(k) and dx is not None and dv is not None and _same_dims(dx, dv):
                return x, k
        return expr, 1.0

    def visit_call_(self, call):  # noqa: D401
        if not _op(call, "relax.matmul"):
            return super().visit_call_(call)
        m = self._match(call)
        if m is None:
            return super().visit_call_(call)
        a, b, vv, mask, scale, score, keys = m
        sa, sb, sv, so = _shape(a), _shape(b), _shape(vv), _shape(call)
        if None in (sa, sb, sv, so) or not all(isinstance(x, int) for x in score) or \
                (mask is not None and _shape(mask) is None):
            return self._route_symbolic(call, m)
        chain = _chain_dims(a, b, vv, call, score)
        if isinstance(chain, str):
            log.debug("attention chain not fused: %s", chain)
            return super().visit_call_(call)
        n, d, mm, dv = sa[-2], sa[-1], sb[-1], sv[-1]
        layout = None
        if mask is not None:
            ms = _shape(mask)
            layout = _mask_layout(ms, score) if ms is not None else None
            if layout is None:
                log.debug("attention chain not fused: mask shape %s does not broadcast to %s", ms, score)
                return super().visit_call_(call)
        bh = dim_product(score[:-2])
        # the kernel writes the caller's output shape (a reshape of the function's output would be a copy)
        out_lead = tuple(so[:-2]) if len(so) >= 3 and so[-2:] == [n, dv] and len(so) != 3 else None
        shape = AttentionShape(bh, n, mm, d, dv, self.lanes, float(scale), layout, out_lead, keys is not None)
        why = supported(shape)
        if why:
            log.debug("attention chain not fused: %s", why)
            return super().visit_call_(call)
        if shape not in self.kernels:
            name = f"attention_fused_{bh}x{n}x{mm}x{d}x{dv}" + ("_mask" if layout else "") + \
                ("_out" + "x".join(map(str, out_lead)) if out_lead else "") + ("_krows" if keys is not None else "")
            f = make_attention_kernel(shape).with_attr("global_symbol", name)
            self.kernels[shape] = self.builder_.add_func(f, name)
        args = [self.builder_.emit(relax.op.reshape(self.visit_expr(a), (bh, n, d))),
                self._keys_arg(b, keys, bh, d, mm),
                self.builder_.emit(relax.op.reshape(self.visit_expr(vv), (bh, mm, dv)))]
        if layout is not None:
            args.append(self.builder_.emit(relax.op.reshape(self.visit_expr(mask), (layout.size,))))
        self.routed += 1
        if out_lead is not None:
            return relax.call_tir(self.kernels[shape], args, relax.TensorType(so, "float32"))
        out = self.builder_.emit(relax.call_tir(self.kernels[shape], args,
                                                relax.TensorType((bh, n, dv), "float32")))
        return relax.op.reshape(out, so)

    def _route_symbolic(self, call, m):
        """The chain ``m`` with run-time dims: the run-time-shaped kernel (one per head dims, scale and mask layout)
        when the head dims are static and every leading dim but the first is static, else the unfused path."""
        a, b, vv, mask, scale, score, keys = m
        chain = _chain_dims(a, b, vv, call, score)
        if isinstance(chain, str):
            log.debug("symbolic attention chain not fused: %s", chain)
            return super().visit_call_(call)
        da, db, dv_, do = chain
        lead = score[:-2]
        n, d, mm, dv = da[-2], da[-1], db[-1], dv_[-1]
        if not (isinstance(d, int) and isinstance(dv, int)) or any(not isinstance(x, int) for x in lead[1:]):
            log.debug("symbolic attention chain not fused: run-time head or inner leading dims %s", score)
            return super().visit_call_(call)
        smask, mdims = None, None
        if mask is not None:
            mdims = _dims(mask)
            smask = _symbolic_mask(mdims, score) if mdims is not None else None
            if smask is None:
                log.debug("symbolic attention chain not fused: mask shape %s vs scores %s", mdims, score)
                return super().visit_call_(call)
        # the kernel writes the caller's output shape when all its leading dims but the first are static
        out_lead = tuple(do[1:-2]) if len(do) > 3 and all(isinstance(x, int) for x in do[1:-2]) and \
            _same_dims(do[-2:], [n, dv]) else None
        shape = SymbolicAttention(d, dv, self.lanes, float(scale), smask, out_lead, keys is not None)
        if value_lanes(dv, self.lanes) is None:
            log.debug("symbolic attention chain not fused: value width %d is not a multiple of 4", dv)
            return super().visit_call_(call)
        if shape not in self.kernels:
            name = f"attention_fused_symbolic_{d}x{dv}_{len(self.kernels)}" + ("_mask" if smask else "")
            f = make_symbolic_attention_kernel(shape).with_attr("global_symbol", name)
            self.kernels[shape] = self.builder_.add_func(f, name)
        bh = dim_product(lead)
        args = [self.builder_.emit(relax.op.reshape(self.visit_expr(a), (bh, n, d))),
                self._keys_arg(b, keys, bh, d, mm),
                self.builder_.emit(relax.op.reshape(self.visit_expr(vv), (bh, mm, dv)))]
        if smask is not None:
            full = [1] * (len(score) - len(mdims)) + list(mdims)
            args.append(self.builder_.emit(relax.op.reshape(self.visit_expr(mask),
                                                            (dim_product(full[:-2]), full[-2], full[-1]))))
        self.routed += 1
        if out_lead is not None:
            return relax.call_tir(self.kernels[shape], args, relax.TensorType(do, "float32"))
        out = self.builder_.emit(relax.call_tir(self.kernels[shape], args, relax.TensorType((bh, n, dv), "float32")))
        return relax.op.reshape(out, do)

    def _keys_arg(self, b, keys, bh, d, mm):
        """The kernel's key operand: ``K`` as (BH, M, D) rows when the chain's Kᵀ is a transpose of ``keys``, else
        the chain's Kᵀ as (BH, D, M)."""
        if keys is not None:
            return self.builder_.emit(relax.op.reshape(self.visit_expr(keys), (bh, mm, d)))
        return self.builder_.emit(relax.op.reshape(self.visit_expr(b), (bh, d, mm)))

    def run(self) -> tvm.IRModule:
        def read(func: relax.Function) -> None:
            self.var2val = relax.analysis.get_var2val(func)
            counter = _UseCounter()
            counter.visit_expr(func)
            self.uses = counter.uses

        return rewrite_functions(self, read)


def RouteAttention(target: tvm.target.Target):  # noqa: N802 - pass constructor naming, like TVM's
    """Module pass replacing softmax-attention chains (static or run-time shapes) by the fused kernels (see module
    docstring); run it before softmax routing and fast math."""
    from .softmax_kernels import vector_bits_of

    lanes = 16 if vector_bits_of(target) >= 512 else 8
    return routing_pass("RouteAttention", lambda mod: _AttentionRouter(mod, lanes),
                        "fused %d softmax attention block(s) into hand kernels", drop_dead_code=True,
                        log_when_none=True, logger=log)
