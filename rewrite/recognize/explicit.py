"""Explicit attention: ``matmul → scale → mask → softmax → dropout → matmul``, anchored at each softmax.

Two walks leave the softmax: up the scores to the Q·Kᵀ matmul (:data:`SCORE_STEPS_TABLE`) and down the
probabilities to the P·V matmul (:data:`PROB_STEPS_TABLE`). Each accepted op on the way is a row; an op with no row
ends the walk with a reason. The three matmul operands are then checked by the layout trace
(:mod:`rewrite.recognize.layout`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..graph.base import GraphView
from ..sites import AttentionSite, MaskTerm
from .common import (HEAD_PROBE_STEPS, MATMUL_REACH_DEPTH, NEG_FILL, PASS_THROUGH, PROB_STEPS, SCORE_STEPS,
                     Spelling, by_kind, fail, kind_of, scalar_scale, strip_scale, users_desc)
from .layout import trace_layout
from .masks import site_mask


# ---------------------------------------------------------------------------------------------------------------
# up: softmax → scores → Q·Kᵀ
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Up:
    g: GraphView
    softmax: Any
    value: Any
    covered: list[Any]
    scale: float = 1.0
    terms: list[MaskTerm] = field(default_factory=list)
    matmul: Any = None
    allowed_users: set = field(default_factory=set)  # users of the scores that a guard below the softmax owns
    merged: bool = False  # the matmul works on batch-merged 3-D views of 4-D operands


def _keeps_last_two(g: GraphView, a: Any, b: Any) -> bool:
    sa, sb = g.shape(a), g.shape(b)
    return bool(sa and sb and len(sa) >= 2 and len(sb) >= 2 and None not in (*sa[-2:], *sb[-2:])
                and tuple(sa[-2:]) == tuple(sb[-2:]))


def reaches_matmul(g: GraphView, value: Any, depth: int = 0, views: bool = False) -> bool:
    """Whether ``value`` is computed from a matmul through scale, mask and cast ops (the scores side of an add);
    with ``views``, also through reshapes that keep the last two axes (batch views)."""
    if depth > MATMUL_REACH_DEPTH:
        return False
    canon = g.canon(g.producer(value))
    if canon is None:
        return False
    if canon.kind == "matmul":
        return True
    if views and canon.kind == "reshape" and _keeps_last_two(g, value, canon.inputs[0]):
        return reaches_matmul(g, canon.inputs[0], depth + 1, views)
    if canon.kind in ("mul", "div", "cast", "identity", "add", "sub", "where", "masked_fill"):
        if canon.kind == "where":
            firsts = [canon.inputs[1], canon.inputs[2]]
        elif canon.kind == "add":
            firsts = list(canon.inputs[:2])
        else:
            firsts = [canon.inputs[0]]
        return any(v is not None and reaches_matmul(g, v, depth + 1, views) for v in firsts)
    return False


def _up_pass(st: _Up, node: Any, canon: Any) -> None:
    st.covered.append(node)
    st.value = canon.inputs[0]


def _up_scale(st: _Up, node: Any, canon: Any) -> None:
    scaled = scalar_scale(st.g, canon)
    if scaled is None:
        raise fail(st.g, node, "a scalar scale on the scores", "a scale that is not one constant number "
                   f"(shape {st.g.shape(canon.inputs[1])})")
    st.covered.append(node)
    st.value, factor = scaled
    st.scale *= factor


def _up_add(st: _Up, node: Any, canon: Any) -> None:
    a, b = canon.inputs[:2]
    if reaches_matmul(st.g, a):
        scores, mask = a, b
    elif reaches_matmul(st.g, b):
        scores, mask = b, a
    elif reaches_matmul(st.g, a, views=True):  # a decomposed SDPA's scores, split back from a 3-D bmm
        scores, mask = a, b
    elif reaches_matmul(st.g, b, views=True):
        scores, mask = b, a
    else:
        raise fail(st.g, node, "scores + mask", "no operand that comes from the Q·Kᵀ matmul")
    st.terms.append(MaskTerm(mask, "add"))
    st.covered.append(node)
    st.value = scores


def _up_where(st: _Up, node: Any, canon: Any) -> None:
    cond, a, b = canon.inputs[:3]
    fa, fb = st.g.scalar(a), st.g.scalar(b)
    if fb is not None and fb <= NEG_FILL:
        st.terms.append(MaskTerm(cond, "keep", fb))
        st.value = a
    elif fa is not None and fa <= NEG_FILL:
        st.terms.append(MaskTerm(cond, "drop", fa))
        st.value = b
    else:
        raise fail(st.g, node, "Where(mask, scores, very negative constant)", "no constant fill value")
    st.covered.append(node)


def _up_masked_fill(st: _Up, node: Any, canon: Any) -> None:
    x, cond, fill = canon.inputs[:3]
    f = st.g.scalar(fill)
    if f is None or f > NEG_FILL:
        raise fail(st.g, node, "masked_fill with a very negative constant", f"fill {fill!r}")
    st.terms.append(MaskTerm(cond, "drop", f))
    st.covered.append(node)
    st.value = x


def _up_matmul(st: _Up, node: Any, canon: Any) -> None:
    g = st.g
    if len(g.users(st.value)) > 1:
        raise fail(g, node, "scores used only by the softmax", f"users: {users_desc(g, st.value)}")
    if len(canon.inputs) > 2 and canon.inputs[2] is not None:  # baddbmm(mask, q, kᵀ)
        if canon.attrs.get("beta", 1) != 1:
            raise fail(g, node, "baddbmm with beta = 1", f"beta = {canon.attrs.get('beta')}")
        st.terms.append(MaskTerm(canon.inputs[2], "add"))
    st.scale *= float(canon.attrs.get("alpha", 1))
    st.covered.append(node)
    st.matmul = node


def _up_batch_view(st: _Up, node: Any, canon: Any) -> None:
    if not _keeps_last_two(st.g, st.value, canon.inputs[0]):
        raise fail(st.g, st.softmax, "scores computed by a Q·Kᵀ matmul (a reshape of the scores may only split "
                   "batch axes)", f"{st.g.node_name(node)} reshapes {st.g.shape(canon.inputs[0])} → "
                   f"{st.g.shape(st.value)}")
    st.covered.append(node)
    st.merged = True
    st.value = canon.inputs[0]


#: Ops accepted between the Q·Kᵀ matmul and the softmax (walked from the softmax up).
SCORE_STEPS_TABLE: tuple[Spelling, ...] = (
    Spelling("scores", PASS_THROUGH, "pass-through", "cast / identity (e.g. an fp32 upcast)", _up_pass),
    Spelling("scores", ("mul", "div"), "scalar-scale", "multiply / divide by one constant number", _up_scale),
    Spelling("scores", ("add",), "additive-mask", "scores + mask (either operand order)", _up_add),
    Spelling("scores", ("where",), "where-fill", "Where(keep, scores, c) or Where(drop, c, scores), c <= -1e3",
             _up_where),
    Spelling("scores", ("masked_fill",), "masked-fill", "masked_fill(scores, drop, c), c <= -1e3", _up_masked_fill),
    Spelling("scores", ("reshape",), "batch-view", "a view splitting the batch axes of a 3-D bmm back to 4-D "
             "(core-ATen decomposed SDPA); the bmm operands are then views of 4-D q and kᵀ", _up_batch_view),
    Spelling("scores", ("matmul",), "qk-matmul", "Q·Kᵀ: matmul / bmm / MatMul, or baddbmm(mask, q, kᵀ, beta=1, "
             "alpha=scale)", _up_matmul),
)
_UP = by_kind(SCORE_STEPS_TABLE)


def upstream(g: GraphView, softmax: Any, covered: list[Any], allowed_users: set | None = None) -> _Up:
    """From the softmax back to the Q·Kᵀ matmul: the walk's state (the matmul node, the scale on the scores, the
    mask terms, whether the matmul runs on batch-merged views). ``allowed_users`` may use the scores besides
    the softmax (a safe-softmax guard)."""
    st = _Up(g, softmax, g.canon(softmax).inputs[0], covered, allowed_users=set(allowed_users or ()))
    for _ in range(SCORE_STEPS):
        node = g.producer(st.value)
        canon = g.canon(node)
        if canon is None:
            raise fail(g, softmax, "scores computed by a Q·Kᵀ matmul",
                       f"{g.value_name(st.value)} made by "
                       f"{g.op_name(node) if node is not None else 'a graph input'}")
        if len([u for u in g.users(st.value) if u not in st.allowed_users]) > 1 and canon.kind != "matmul":
            raise fail(g, node, "scores used only by the softmax", f"users: {users_desc(g, st.value)}")
        rows = _UP.get(canon.kind)
        if not rows:
            raise fail(g, softmax, "scores computed by a Q·Kᵀ matmul (with optional scale, mask, cast)",
                       f"{g.node_name(node)} ({g.op_name(node)})")
        rows[0].handler(st, node, canon)
        if st.matmul is not None:
            return st
    raise fail(g, softmax, "a Q·Kᵀ matmul within a few ops of the softmax", "a longer chain")


# ---------------------------------------------------------------------------------------------------------------
# down: softmax → probabilities → P·V
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Down:
    g: GraphView
    softmax: Any
    p: Any
    covered: list[Any]
    done: tuple[Any, Any] | None = None
    scores_users: set = field(default_factory=set)  # guard nodes that also read the scores
    row_guards: list = field(default_factory=list)  # keep masks p is multiplied by (checked against the scores)
    merged: bool = False  # the probabilities went through a batch-merging view


def _nan_guard(st: _Down, users: list[Any]) -> bool:
    """``Where(IsNaN(p), 0, p)`` after the softmax (ONNX exports of SDPA with bool masks)."""
    g = st.g
    kinds = {kind_of(g, u): u for u in users}
    if set(kinds) != {"isnan", "where"}:
        return False
    where = kinds["where"]
    wc = g.canon(where)
    if wc.inputs[2] is st.p and g.producer(wc.inputs[0]) is kinds["isnan"] and g.scalar(wc.inputs[1]) == 0:
        st.covered += [kinds["isnan"], where]
        st.p = g.outputs(where)[0]
        return True
    return False


def _guard_condition(g: GraphView, cond: Any, scores: Any) -> list[Any] | None:
    """The nodes of ``not(any(not(scores == -inf), -1))`` (rows with every score masked: the safe softmax of
    core-ATen decompositions; casts around ``any`` allowed), or None when ``cond`` is something else."""
    nodes = []
    for kind in ("not", "any", "not", "compare"):
        node = g.producer(cond)
        canon = g.canon(node) if node is not None else None
        while canon is not None and canon.kind == "cast" and kind == "any":  # Cast(ReduceMax(Cast(b))) in ONNX
            nodes.append(node)
            cond = canon.inputs[0]
            node = g.producer(cond)
            canon = g.canon(node) if node is not None else None
        if canon is None or canon.kind != kind:
            return None
        nodes.append(node)
        cond = canon.inputs[0]
    by_kind = {g.canon(n).kind: n for n in nodes}
    any_canon, cmp = g.canon(by_kind["any"]), g.canon(by_kind["compare"])
    shape = g.shape(scores)
    if shape is None or any_canon.attrs["axis"] != len(shape) - 1 or cmp.attrs["op"] != "eq" \
            or cmp.inputs[0] is not scores or g.scalar(cmp.inputs[1]) != float("-inf"):
        return None
    return nodes


def _zeros_like_p(g: GraphView, value: Any, p: Any, users: list[Any]) -> list[Any] | None:
    """The nodes making ``value`` = zeros shaped like ``p`` from ``users`` of p: ``full_like(p, 0)`` (FX) or
    ``Expand(0, Shape(p))`` (ONNX). None otherwise."""
    node = g.producer(value)
    canon = g.canon(node) if node is not None else None
    if canon is None:
        return None
    if canon.kind == "full_like" and canon.inputs[0] is p and canon.attrs["value"] == 0:
        return [node]
    if canon.kind == "expand" and g.scalar(canon.inputs[0]) == 0:
        shape_of = g.producer(g.raw_inputs(node)[1]) if len(g.raw_inputs(node)) > 1 else None
        if shape_of is not None and shape_of in users and g.op_name(shape_of) == "Shape":
            return [node, shape_of]
    return None


def _safe_softmax(st: _Down, users: list[Any]) -> bool:
    """``Where(all_masked_row, zeros_like(p), p)`` (``_safe_softmax`` decomposed): fully masked rows give 0."""
    g = st.g
    wheres = [u for u in users if kind_of(g, u) == "where" and g.canon(u).inputs[2] is st.p]
    if len(wheres) != 1:
        return False
    where = wheres[0]
    wc = g.canon(where)
    zeros = _zeros_like_p(g, wc.inputs[1], st.p, users)
    if zeros is None or set(map(id, users)) != {id(where), id(zeros[-1])}:
        return False
    guard = _guard_condition(g, wc.inputs[0], g.canon(st.softmax).inputs[0])
    if guard is None:
        return False
    st.covered += [*zeros, where, *guard]
    st.scores_users.add(guard[-1])
    st.p = g.outputs(where)[0]
    return True


def _down_pass(st: _Down, user: Any, canon: Any) -> None:
    st.covered.append(user)
    st.p = st.g.outputs(user)[0]


def _down_dropout(st: _Down, user: Any, canon: Any) -> None:
    if canon.attrs["p"] > 0 and canon.attrs["train"]:
        raise fail(st.g, user, "dropout inactive at inference (p = 0 or training off)",
                   f"p = {canon.attrs['p']} in training mode")
    _down_pass(st, user, canon)


def _down_row_guard(st: _Down, user: Any, canon: Any) -> None:
    """``p × keep`` (the canonical form's zero for fully masked rows): ``keep`` (a bool, maybe cast) must be the
    mask applied to the scores, which :func:`check_row_guards` verifies once the scores are walked."""
    g = st.g
    a, b = canon.inputs[:2]
    other = b if a is st.p else (a if b is st.p else None)
    keep = other
    inner = g.canon(g.producer(other)) if other is not None and not isinstance(other, (int, float)) else None
    if inner is not None and inner.kind == "cast":
        keep = inner.inputs[0]
    if other is None or isinstance(other, (int, float)) or g.dtype(keep) != "bool":
        raise fail(g, st.softmax, "softmax feeding a matmul with V (P·V)",
                   f"it feeds {g.node_name(user)} ({g.op_name(user)})")
    st.row_guards.append(keep)
    if inner is not None and inner.kind == "cast":
        st.covered.append(g.producer(other))
    _down_pass(st, user, canon)


def check_row_guards(g: GraphView, softmax: Any, guards: list[Any], terms: list[MaskTerm]) -> None:
    """Each row guard's keep mask is a keep term of the scores, or ``M > c`` (c <= -1e3) of an additive term M:
    then ``p × keep`` changes nothing but fully masked rows."""
    for keep in guards:
        if any(t.mode == "keep" and t.value is keep for t in terms):
            continue
        canon = g.canon(g.producer(keep))
        if canon is not None and canon.kind == "compare" and canon.attrs["op"] in ("gt", "ge"):
            c = g.scalar(canon.inputs[1])
            if c is not None and c <= NEG_FILL and any(t.mode == "add" and t.value is canon.inputs[0] for t in terms):
                continue
        raise fail(g, softmax, "a row guard p × keep whose keep is the mask applied to the scores",
                   f"keep {g.value_name(keep)}, not a mask of the scores")


def _down_batch_view(st: _Down, user: Any, canon: Any) -> None:
    g = st.g
    out = g.outputs(user)[0]
    if canon.kind == "expand" and g.shape(out) is not None and g.shape(out) == g.shape(st.p):
        _down_pass(st, user, canon)  # a no-op broadcast
        return
    if canon.kind == "reshape" and _keeps_last_two(g, out, st.p):
        st.merged = True
        _down_pass(st, user, canon)
        return
    raise fail(g, st.softmax, "softmax feeding a matmul with V (P·V) (views may only merge batch axes)",
               f"it feeds {g.node_name(user)} ({g.op_name(user)}) {g.shape(st.p)} → {g.shape(out)}")


def _down_matmul(st: _Down, user: Any, canon: Any) -> None:
    if canon.inputs[0] is st.p and len(canon.inputs) == 2:
        st.covered.append(user)
        out, v = user, canon.inputs[1]
        if st.merged:  # the P·V bmm of a decomposed SDPA: its output is split back to 4-D by one view
            g = st.g
            users = g.users(g.outputs(user)[0])
            if len(users) != 1 or kind_of(g, users[0]) != "reshape" \
                    or not _keeps_last_two(g, g.outputs(users[0])[0], g.outputs(user)[0]):
                raise fail(g, user, "the batch-merged P·V product split back by one view",
                           f"users: {users_desc(g, g.outputs(user)[0])}")
            out = users[0]
            st.covered.append(out)
        st.done = (out, v)
        return
    raise fail(st.g, st.softmax, "softmax feeding a matmul with V (P·V)",
               f"it feeds {st.g.node_name(user)} ({st.g.op_name(user)}) as the right operand")


#: Ops accepted between the softmax and the P·V matmul (walked from the softmax down). A row with kinds of two
#: users is matched on the set of users of the probabilities.
PROB_STEPS_TABLE: tuple[Spelling, ...] = (
    Spelling("probs", ("isnan", "where"), "nan-guard", "Where(IsNaN(p), 0, p) (SDPA exports with bool masks)"),
    Spelling("probs", ("full_like", "where"), "safe-softmax",
             "Where(not(any(not(scores == -inf), -1)), zeros_like(p), p) (core-ATen _safe_softmax; in ONNX "
             "any = Cast/ReduceMax/Cast and zeros = Expand(0, Shape(p)))"),
    Spelling("probs", PASS_THROUGH, "pass-through", "cast / identity (e.g. back from an fp32 upcast)", _down_pass),
    Spelling("probs", ("mul",), "row-guard", "p × keep (cast), keep being the mask applied to the scores "
             "(softswap's canonical form: fully masked rows give 0)", _down_row_guard),
    Spelling("probs", ("expand", "reshape"), "batch-view", "no-op expand, then a view merging batch axes before a "
             "3-D bmm with V (core-ATen decomposed SDPA); the product is split back to 4-D", _down_batch_view),
    Spelling("probs", ("dropout",), "dropout", "dropout inactive at inference (p = 0 or eval)", _down_dropout),
    Spelling("probs", ("matmul",), "pv-matmul", "P·V: matmul / bmm / MatMul with P as the left operand",
             _down_matmul),
)
_DOWN = by_kind(r for r in PROB_STEPS_TABLE if r.handler is not None)
_USER_SETS = {"nan-guard": _nan_guard, "safe-softmax": _safe_softmax}


def downstream(g: GraphView, softmax: Any, covered: list[Any]) -> _Down:
    """From the softmax to the P·V matmul: the walk's state (``done`` = (the node making the site output, v))."""
    st = _Down(g, softmax, g.outputs(softmax)[0], covered)
    for _ in range(PROB_STEPS):
        users = g.users(st.p)
        if g.is_graph_output(st.p):
            raise fail(g, softmax, "attention probabilities used only by the P·V matmul",
                       f"{g.value_name(st.p)} is also a graph output (users: {users_desc(g, st.p)})")
        if not users:
            raise fail(g, softmax, "softmax feeding a matmul with V", "its output feeds nothing")
        if len(users) == 2 and any(guard(st, users) for guard in _USER_SETS.values()):
            continue
        if len(users) != 1:
            raise fail(g, softmax, "attention probabilities used only by the P·V matmul",
                       f"{len(users)} users: {users_desc(g, st.p)}")
        user = users[0]
        canon = g.canon(user)
        rows = _DOWN.get(canon.kind) if canon is not None else None
        if not rows:
            raise fail(g, softmax, "softmax feeding a matmul with V (P·V)",
                       f"it feeds {g.node_name(user)} ({g.op_name(user)})")
        rows[0].handler(st, user, canon)
        if st.done is not None:
            return st
    raise fail(g, softmax, "a P·V matmul within a few ops of the softmax", "a longer chain")


# ---------------------------------------------------------------------------------------------------------------
# the site
# ---------------------------------------------------------------------------------------------------------------

def probe_heads(g: GraphView, value: Any) -> int | None:
    """Heads of a projection, found by walking back (first operand) through elementwise ops such as RoPE to the
    head-splitting reshape; used only to count heads, never to validate a layout."""
    for _ in range(HEAD_PROBE_STEPS):
        node = g.producer(value)
        canon = g.canon(node)
        if canon is None or not canon.inputs or canon.inputs[0] is None:
            return None
        if canon.kind == "reshape":
            out_shape, in_shape = g.shape(value), g.shape(canon.inputs[0])
            if out_shape and in_shape and len(out_shape) == 4 and isinstance(out_shape[-2], int) \
                    and out_shape[-1] != in_shape[-1]:
                return out_shape[-2]
        value = canon.inputs[0]
    return None


def _unmerged(g: GraphView, value: Any, rank: int, softmax: Any, covered: list[Any], what: str) -> Any:
    """The ``rank``-D operand behind a batch-merging view (and a no-op expand) of a 3-D bmm operand."""
    node = g.producer(value)
    canon = g.canon(node) if node is not None else None
    if canon is not None and canon.kind == "reshape" and _keeps_last_two(g, value, canon.inputs[0]):
        x = canon.inputs[0]
        nodes = [node]
        inner = g.canon(g.producer(x))
        if inner is not None and inner.kind == "identity":  # the contiguous copy of the expand
            nodes.append(g.producer(x))
            x = inner.inputs[0]
            inner = g.canon(g.producer(x))
        if inner is not None and inner.kind == "expand" and g.shape(inner.inputs[0]) == g.shape(x):
            nodes.append(g.producer(x))
            x = inner.inputs[0]
        shape = g.shape(x)
        if shape is not None and len(shape) == rank:
            covered.extend(nodes)
            return x
    raise fail(g, softmax, f"{what} of the batch-merged matmul: a view of a {rank}-D tensor merging its batch axes",
               f"{g.value_name(value)} of shape {g.shape(value)}")


def explicit_site(g: GraphView, softmax: Any, index: int) -> AttentionSite:
    """The attention site anchored at ``softmax``, or :class:`~rewrite.sites.NoMatch` with the reason."""
    canon = g.canon(softmax)
    x = canon.inputs[0]
    shape = g.shape(x)
    r = len(shape) if shape is not None else None
    if r is None:
        raise fail(g, softmax, "scores of known rank", "no shape information")
    if canon.attrs["axis"] != r - 1:
        raise fail(g, softmax, f"softmax over the last axis ({r - 1})", f"axis {canon.attrs['axis']}")
    if r not in (3, 4):
        raise fail(g, softmax, "4-D (B, H, S, T) or 3-D (B·H, S, T) scores", f"rank {r}")
    covered: list[Any] = [softmax]
    down = downstream(g, softmax, covered)
    pv, v = down.done
    up = upstream(g, softmax, covered, down.scores_users)
    qk, scale, terms = up.matmul, up.scale, up.terms
    check_row_guards(g, softmax, down.row_guards, terms)
    qk_canon = g.canon(qk)
    q, k_op = qk_canon.inputs[0], qk_canon.inputs[1]
    if up.merged or down.merged:  # a 3-D bmm between views of 4-D operands
        q, k_op, v = (_unmerged(g, x, r, softmax, covered, what) for x, what in ((q, "Q"), (k_op, "Kᵀ"), (v, "V")))
    q, sq = strip_scale(g, q)
    kt, sk = strip_scale(g, k_op)
    scale *= sq * sk
    batch = [f"X{i}" for i in range(r - 2)]
    tq = trace_layout(g, q, batch + ["T", "F"], "Q", softmax)
    tk = trace_layout(g, kt, batch + ["F", "T"], "K (as Kᵀ in Q·Kᵀ)", softmax)
    tv = trace_layout(g, v, batch + ["T", "F"], "V", softmax)
    q_shape = g.shape(q) or ()
    head_dim = q_shape[-1] if q_shape and isinstance(q_shape[-1], int) else None
    if r == 4:
        heads = next((d for d in (q_shape[1] if len(q_shape) == 4 else None, shape[1], tq.heads,
                                  probe_heads(g, q)) if isinstance(d, int)), None)
        layout = "BHSD"
    else:
        heads = tq.heads or probe_heads(g, q)
        layout = "(BH)SD"
    kv_heads = tk.kv_heads or tv.kv_heads or heads
    if math.isnan(scale) or scale <= 0:
        raise fail(g, qk, "a positive scale", f"{scale}")
    mask, terms = site_mask(g, terms, False, anchor=softmax, lengths=(shape[-2], shape[-1]))
    causal = mask in ("causal", "causal+padding")
    return AttentionSite(
        name=f"attn{index}", spelling=f"explicit-{g.kind}", q=q, k=kt, v=v, output=g.outputs(pv)[0], scale=scale,
        causal=causal, mask=mask, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        layout=layout, k_transposed=True, mask_terms=terms, dtype=g.dtype(q), anchor=softmax,
        nodes=[g.node_name(n) for n in covered])
