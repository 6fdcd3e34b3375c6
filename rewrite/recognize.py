"""Recognizers: turn regions of a graph into :class:`AttentionSite` and :class:`ClassifierHead` records.

Written once against :mod:`rewrite.graph.base` and run on both graph kinds. The explicit-attention recognizer is
anchored at each ``softmax`` node and walks at most a few dozen nodes around it, so recognition is linear in graph
size. A candidate that does not qualify raises :class:`~rewrite.sites.NoMatch` with the node, what was expected and
what was found; a wrong match is worse than a miss, so permutations, the softmax axis and the scale are checked
exactly.

Layout check (the "permute mistaken for transpose" trap, spec/rewriting.md §3.1): each operand of the two matmuls
gets a role per axis (batch labels ``X0, X1``, tokens ``T``, features ``F``); the roles are carried back through
transposes, selects and reshapes to where the tensor was made. There, the features must be the last axis and the
tokens the axis before it — or, at a head-splitting reshape (``(.., E) → (.., H, F)``), the heads (a batch label)
must sit just before the features with the tokens further left.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .graph.base import GraphView, walk_ancestors
from .sites import AttentionSite, ClassifierHead, MaskTerm, NoMatch, Reason

log = logging.getLogger(__name__)

_PASS_THROUGH = ("cast", "identity")
_FUSED = ("sdpa", "mha_native", "ort_attention", "ort_mha", "onnx_attention")
#: A mask value at or below this masks a score out (fills, additive masks, key-padding derivation).
NEG_FILL = -1e3
_NEG_FILL = NEG_FILL


@dataclass
class Recognition:
    """Everything the recognizers found in one graph."""

    attention_sites: list[AttentionSite] = field(default_factory=list)
    heads: list[ClassifierHead] = field(default_factory=list)
    unmatched: list[tuple[str, Reason]] = field(default_factory=list)  # (softmax node name, reason)
    softmax_count: int = 0
    unknown_ops: dict[str, int] = field(default_factory=dict)


def _fail(g: GraphView, node: Any, expected: str, found: str) -> NoMatch:
    return NoMatch(Reason(node=g.node_name(node), op=g.op_name(node), expected=expected, found=found))


def _users_desc(g: GraphView, value: Any) -> str:
    names = [f"{g.node_name(u)} ({g.op_name(u)})" for u in g.users(value)]
    if g.is_graph_output(value):
        names.append("a graph output")
    return ", ".join(names) or "nothing"


def _is_scalar_scale(g: GraphView, canon: Any) -> tuple[Any, float] | None:
    """For mul/div by a scalar constant: (the other operand, the factor). None otherwise."""
    if canon is None or canon.kind not in ("mul", "div"):
        return None
    a, b = canon.inputs[:2]
    sb = g.scalar(b)
    if sb is not None and sb != 0:
        return a, (sb if canon.kind == "mul" else 1.0 / sb)
    if canon.kind == "mul":
        sa = g.scalar(a)
        if sa is not None:
            return b, sa
    return None


# ----------------------------------------------------------------------------------------------------------------
# layout roles
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class _Trace:
    source: Any
    heads: int | None = None
    kv_heads: int | None = None


def _trace_layout(g: GraphView, value: Any, roles: list[str], what: str, anchor: Any) -> _Trace:
    """Carry axis ``roles`` of ``value`` back to where the tensor was made, and check them there (module doc)."""
    trace = _Trace(source=value)
    saw_expand = False
    for _ in range(24):
        node = g.producer(value)
        canon = g.canon(node)
        if canon is None:
            break
        kind = canon.kind
        if kind in _PASS_THROUGH or (kind == "dropout" and (canon.attrs["p"] == 0 or not canon.attrs["train"])):
            value = canon.inputs[0]
            continue
        scaled = _is_scalar_scale(g, canon)
        if scaled is not None:
            value = scaled[0]
            continue
        if kind == "transpose":
            perm = canon.attrs["perm"]
            if len(perm) != len(roles):
                break
            back = [""] * len(perm)
            for i, p in enumerate(perm):
                back[p] = roles[i]
            roles, value = back, canon.inputs[0]
            continue
        if kind == "select":
            axis = canon.attrs["axis"]
            roles = roles[:axis] + ["SEL"] + roles[axis:]
            value = canon.inputs[0]
            continue
        if kind == "slice":
            value = canon.inputs[0]
            continue
        if kind == "expand":
            saw_expand = True
            value = canon.inputs[0]
            continue
        if kind == "unsqueeze" and saw_expand:
            src_shape = g.shape(canon.inputs[0])
            if src_shape is not None and len(src_shape) == 4 and isinstance(src_shape[1], int):
                trace.kv_heads = src_shape[1]
            value = canon.inputs[0]
            roles = [r for r in roles if r != "SEL"]
            # the inserted axis carried a repeat; drop one batch label to get back to the source rank
            if len(roles) > (len(src_shape) if src_shape else len(roles)):
                roles = roles[:len(roles) - 3] + roles[-2:]
            continue
        if kind == "reshape":
            out_shape, in_shape = g.shape(value), g.shape(canon.inputs[0])
            src = g.canon(g.producer(canon.inputs[0]))
            if src is not None and src.kind == "expand" and len(roles) >= 3:  # GQA repeat_kv: (B,Hkv,n,T,D)->(B,H,T,D)
                roles = roles[:-3] + [roles[-3], "X_rep"] + roles[-2:]
                value = canon.inputs[0]
                continue
            if out_shape is None or in_shape is None or len(in_shape) < 2 or len(out_shape) < 2:
                break
            if out_shape[-1] is not None and out_shape[-1] == in_shape[-1] and out_shape[-2] is not None \
                    and out_shape[-2] == in_shape[-2]:
                roles = [f"X{i}" for i in range(len(in_shape) - 2)] + roles[-2:]
                value = canon.inputs[0]
                continue
            if not (isinstance(out_shape[-1], int) and isinstance(in_shape[-1], int)) or out_shape[-1] == in_shape[-1]:
                break  # unknown or symbolic dims: cannot prove a head split; check the canonical layout here
            # a head split: (.., E) -> (.., H, F)
            if roles[-1] != "F" or not roles[-2].startswith("X"):
                raise _fail(g, anchor, f"{what}: heads and features in the last two axes of the head split at "
                            f"{g.node_name(node)}, reached by a transpose of the last two axes",
                            f"axis roles {roles} after the permutations")
            left = [r for r in roles[:-2] if r != "SEL"]
            if not left or left[-1] != "T":
                raise _fail(g, anchor, f"{what}: token axis just left of the heads at {g.node_name(node)}, reached "
                            "by a transpose of the last two axes", f"axis roles {roles} after the permutations")
            if isinstance(out_shape[-2], int):
                trace.heads = out_shape[-2]
            elif isinstance(in_shape[-1], int) and isinstance(out_shape[-1], int) and out_shape[-1]:
                trace.heads = in_shape[-1] // out_shape[-1]
            trace.source = value
            return trace
        break
    trace.source = value
    if roles[-1] != "F" or roles[-2] != "T":
        perm_hint = "; permuted so that heads and token positions are exchanged" if "T" in roles else ""
        raise _fail(g, anchor, f"{what} with tokens then features in its last two axes (…, T, F), reached by a "
                    f"transpose of the last two axes",
                    f"axis roles {roles} at {g.value_name(value)}{perm_hint}")
    return trace


# ----------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------

def _data_sources(g: GraphView, value: Any) -> tuple[list[Any], bool]:
    """Graph inputs that ``value`` depends on through data (not through shapes), and whether a causal
    comparison (two arange-derived operands) or a triangle op appears on the way."""
    inputs: list[Any] = []
    causal = False
    seen: set = set()
    stack = [value]
    steps = 0
    while stack and steps < 300:
        v = stack.pop()
        if v is None or isinstance(v, (int, float, bool, str, list, tuple)):
            continue
        k = g.key(v)
        if k in seen:
            continue
        seen.add(k)
        steps += 1
        if g.is_graph_input(v):
            inputs.append(v)
            continue
        node = g.producer(v)
        if node is None:
            continue
        op = g.op_name(node)
        if "sym_size" in op or op in ("Shape", "Size"):
            continue
        canon = g.canon(node)
        if canon is not None and canon.kind == "trilu":
            causal = True
        if canon is not None and canon.kind == "compare":
            arange_sides = sum(any(g.canon(n) is not None and g.canon(n).kind == "arange"
                                   for n in walk_ancestors(g, [x], limit=12)) for x in canon.inputs[:2])
            if arange_sides == 2:
                causal = True
        stack.extend(x for x in g.raw_inputs(node))
    return inputs, causal


def _uniform_source(g: GraphView, value: Any) -> Any | None:
    """The small constant ``value`` broadcasts from (through expand/reshape/cast/identity), or None."""
    for _ in range(8):
        arr = g.const_array(value, 1 << 16)
        if arr is not None:
            return arr
        canon = g.canon(g.producer(value))
        if canon is None or canon.kind not in ("expand", "reshape", "cast", "identity", "unsqueeze"):
            return None
        value = canon.inputs[0]
    return None


def _always_true(g: GraphView, value: Any) -> bool:
    """A boolean mask that is True everywhere: a constant of Trues, or ``arange(...) >= 0`` (HF ViT's mask)."""
    arr = _uniform_source(g, value)
    if arr is not None:
        return bool(arr.size) and bool(arr.astype(bool).all())
    for _ in range(8):
        canon = g.canon(g.producer(value))
        if canon is None:
            return False
        if canon.kind in ("expand", "reshape", "cast", "identity", "unsqueeze"):
            value = canon.inputs[0]
            continue
        if canon.kind == "compare" and canon.attrs["op"] in ("ge", "gt"):
            a, b = canon.inputs[:2]
            for _ in range(8):  # arange through unsqueeze / expand / "+ 0"
                ca = g.canon(g.producer(a))
                if ca is not None and (ca.kind in ("unsqueeze", "expand", "reshape", "identity", "cast")
                                       or (ca.kind == "add" and g.scalar(ca.inputs[1]) == 0)):
                    a = ca.inputs[0]
                    continue
                break
            ca = g.canon(g.producer(a))
            bound = g.scalar(b)
            if ca is not None and ca.kind == "arange" and bound is not None and \
                    (bound < 0 or (bound == 0 and canon.attrs["op"] == "ge")):
                return True
        return False
    return False


def _no_op_term(g: GraphView, term: MaskTerm) -> bool:
    """A mask term that masks nothing (all-true keep mask, all-zero additive mask) and can be dropped."""
    if term.mode == "keep":
        return _always_true(g, term.value)
    if term.mode == "add":
        arr = _uniform_source(g, term.value)
        if arr is not None:
            return bool((arr == 0).all())
        canon = g.canon(g.producer(term.value))
        if canon is not None and canon.kind == "where":
            cond, a, b = canon.inputs[:3]
            return g.scalar(a) == 0 and _always_true(g, cond)
    return False


def _triangular(arr: Any, mode: str) -> bool:
    import numpy as np
    a = np.asarray(arr)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        return False
    n = a.shape[-1]
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    if mode == "add":
        masked = a < _NEG_FILL
    elif mode == "keep":
        masked = ~a.astype(bool)
    else:
        masked = a.astype(bool)
    return bool(np.all(masked == upper))


def classify_mask(g: GraphView, terms: list[MaskTerm], causal_flag: bool, token_axis_len: Any = None) -> str:
    """The mask kind of a site (one of :data:`rewrite.sites.MASK_KINDS`) from its mask terms' provenance."""
    if not terms:
        return "causal" if causal_flag else "none"
    causal, padding, arbitrary, boolean = causal_flag, False, False, False
    for term in terms:
        boolean |= term.mode in ("keep", "drop")
        sources, causal_ops = _data_sources(g, term.value)
        if sources:
            for src in sources:
                boolean |= g.dtype(src) == "bool"
                shape = g.shape(src)
                if shape is not None and (len(shape) == 2 or (len(shape) >= 3 and shape[-2] == 1)):
                    padding = True
                else:
                    arbitrary = True
            causal |= causal_ops
        elif causal_ops:
            causal = True
        else:
            arr = g.const_array(term.value)
            if arr is not None and _triangular(arr, term.mode):
                causal = True
            else:
                arbitrary = True
    if arbitrary:
        return "boolean" if boolean else "additive"
    if causal and padding:
        return "causal+padding"
    if causal:
        return "causal"
    if padding:
        return "key_padding"
    return "additive"


# ----------------------------------------------------------------------------------------------------------------
# explicit attention: matmul -> scale -> mask -> softmax -> dropout -> matmul
# ----------------------------------------------------------------------------------------------------------------

def _downstream(g: GraphView, softmax: Any, covered: list[Any]) -> tuple[Any, Any]:
    """From the softmax to the P·V matmul. Returns (the P·V node, v)."""
    p = g.outputs(softmax)[0]
    for _ in range(8):
        users = g.users(p)
        if g.is_graph_output(p):
            raise _fail(g, softmax, "attention probabilities used only by the P·V matmul",
                        f"{g.value_name(p)} is also a graph output (users: {_users_desc(g, p)})")
        if not users:
            raise _fail(g, softmax, "softmax feeding a matmul with V", "its output feeds nothing")
        if len(users) == 2:  # the Where(IsNaN(p), 0, p) guard of SDPA exports
            kinds = {g.canon(u).kind if g.canon(u) else None: u for u in users}
            if set(kinds) == {"isnan", "where"}:
                where = kinds["where"]
                wc = g.canon(where)
                if wc.inputs[2] is p and g.producer(wc.inputs[0]) is kinds["isnan"] and g.scalar(wc.inputs[1]) == 0:
                    covered += [kinds["isnan"], where]
                    p = g.outputs(where)[0]
                    continue
        if len(users) != 1:
            raise _fail(g, softmax, "attention probabilities used only by the P·V matmul",
                        f"{len(users)} users: {_users_desc(g, p)}")
        user = users[0]
        canon = g.canon(user)
        kind = canon.kind if canon else None
        if kind in _PASS_THROUGH:
            covered.append(user)
            p = g.outputs(user)[0]
            continue
        if kind == "dropout":
            if canon.attrs["p"] > 0 and canon.attrs["train"]:
                raise _fail(g, user, "dropout inactive at inference (p = 0 or training off)",
                            f"p = {canon.attrs['p']} in training mode")
            covered.append(user)
            p = g.outputs(user)[0]
            continue
        if kind == "matmul" and canon.inputs[0] is p and len(canon.inputs) == 2:
            covered.append(user)
            return user, canon.inputs[1]
        raise _fail(g, softmax, "softmax feeding a matmul with V (P·V)",
                    f"it feeds {g.node_name(user)} ({g.op_name(user)})"
                    + (" as the right operand" if kind == "matmul" else ""))
    raise _fail(g, softmax, "a P·V matmul within a few ops of the softmax", "a longer chain")


def _reaches_matmul(g: GraphView, value: Any, depth: int = 0) -> bool:
    if depth > 6:
        return False
    canon = g.canon(g.producer(value))
    if canon is None:
        return False
    if canon.kind == "matmul":
        return True
    if canon.kind in ("mul", "div", "cast", "identity", "add", "sub", "where", "masked_fill"):
        if canon.kind == "where":
            firsts = [canon.inputs[1], canon.inputs[2]]
        elif canon.kind == "add":
            firsts = list(canon.inputs[:2])
        else:
            firsts = [canon.inputs[0]]
        return any(v is not None and _reaches_matmul(g, v, depth + 1) for v in firsts)
    return False


def _upstream(g: GraphView, softmax: Any, covered: list[Any]) -> tuple[Any, float, list[MaskTerm]]:
    """From the softmax back to the Q·Kᵀ matmul. Returns (the matmul node, scale on the scores, mask terms)."""
    value = g.canon(softmax).inputs[0]
    scale = 1.0
    terms: list[MaskTerm] = []
    for _ in range(16):
        node = g.producer(value)
        canon = g.canon(node)
        if canon is None:
            raise _fail(g, softmax, "scores computed by a Q·Kᵀ matmul",
                        f"{g.value_name(value)} made by {g.op_name(node) if node is not None else 'a graph input'}")
        kind = canon.kind
        if len(g.users(value)) > 1 and kind != "matmul":
            raise _fail(g, node, "scores used only by the softmax", f"users: {_users_desc(g, value)}")
        if kind in _PASS_THROUGH:
            covered.append(node)
            value = canon.inputs[0]
            continue
        scaled = _is_scalar_scale(g, canon)
        if scaled is not None:
            covered.append(node)
            value, factor = scaled
            scale *= factor
            continue
        if kind in ("mul", "div"):
            raise _fail(g, node, "a scalar scale on the scores", "a scale that is not one constant number "
                        f"(shape {g.shape(canon.inputs[1])})")
        if kind == "add":
            a, b = canon.inputs[:2]
            if _reaches_matmul(g, a):
                scores, mask = a, b
            elif _reaches_matmul(g, b):
                scores, mask = b, a
            else:
                raise _fail(g, node, "scores + mask", "no operand that comes from the Q·Kᵀ matmul")
            terms.append(MaskTerm(mask, "add"))
            covered.append(node)
            value = scores
            continue
        if kind == "where":
            cond, a, b = canon.inputs[:3]
            fa, fb = g.scalar(a), g.scalar(b)
            if fb is not None and fb <= _NEG_FILL:
                terms.append(MaskTerm(cond, "keep", fb))
                value = a
            elif fa is not None and fa <= _NEG_FILL:
                terms.append(MaskTerm(cond, "drop", fa))
                value = b
            else:
                raise _fail(g, node, "Where(mask, scores, very negative constant)", "no constant fill value")
            covered.append(node)
            continue
        if kind == "masked_fill":
            x, cond, fill = canon.inputs[:3]
            f = g.scalar(fill)
            if f is None or f > _NEG_FILL:
                raise _fail(g, node, "masked_fill with a very negative constant", f"fill {fill!r}")
            terms.append(MaskTerm(cond, "drop", f))
            covered.append(node)
            value = x
            continue
        if kind == "matmul":
            if len(g.users(value)) > 1:
                raise _fail(g, node, "scores used only by the softmax", f"users: {_users_desc(g, value)}")
            if len(canon.inputs) > 2 and canon.inputs[2] is not None:  # baddbmm(mask, q, kᵀ)
                if canon.attrs.get("beta", 1) != 1:
                    raise _fail(g, node, "baddbmm with beta = 1", f"beta = {canon.attrs.get('beta')}")
                terms.append(MaskTerm(canon.inputs[2], "add"))
            scale *= float(canon.attrs.get("alpha", 1))
            covered.append(node)
            return node, scale, terms
        raise _fail(g, softmax, "scores computed by a Q·Kᵀ matmul (with optional scale, mask, cast)",
                    f"{g.node_name(node)} ({g.op_name(node)})")
    raise _fail(g, softmax, "a Q·Kᵀ matmul within a few ops of the softmax", "a longer chain")


def _probe_heads(g: GraphView, value: Any) -> int | None:
    """Heads of a projection, found by walking back (first operand) through elementwise ops such as RoPE to the
    head-splitting reshape; used only to count heads, never to validate a layout."""
    for _ in range(16):
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


def _strip_scale(g: GraphView, value: Any) -> tuple[Any, float]:
    factor = 1.0
    for _ in range(8):
        scaled = _is_scalar_scale(g, g.canon(g.producer(value)))
        if scaled is None:
            break
        value, f = scaled
        factor *= f
    return value, factor


def _explicit_site(g: GraphView, softmax: Any, index: int) -> AttentionSite:
    canon = g.canon(softmax)
    x = canon.inputs[0]
    shape = g.shape(x)
    r = len(shape) if shape is not None else None
    if r is None:
        raise _fail(g, softmax, "scores of known rank", "no shape information")
    if canon.attrs["axis"] != r - 1:
        raise _fail(g, softmax, f"softmax over the last axis ({r - 1})", f"axis {canon.attrs['axis']}")
    if r not in (3, 4):
        raise _fail(g, softmax, "4-D (B, H, S, T) or 3-D (B·H, S, T) scores", f"rank {r}")
    covered: list[Any] = [softmax]
    pv, v = _downstream(g, softmax, covered)
    qk, scale, terms = _upstream(g, softmax, covered)
    qk_canon = g.canon(qk)
    q, sq = _strip_scale(g, qk_canon.inputs[0])
    kt, sk = _strip_scale(g, qk_canon.inputs[1])
    scale *= sq * sk
    batch = [f"X{i}" for i in range(r - 2)]
    tq = _trace_layout(g, q, batch + ["T", "F"], "Q", softmax)
    tk = _trace_layout(g, kt, batch + ["F", "T"], "K (as Kᵀ in Q·Kᵀ)", softmax)
    tv = _trace_layout(g, v, batch + ["T", "F"], "V", softmax)
    q_shape, v_shape = g.shape(q) or (), g.shape(v) or ()
    head_dim = q_shape[-1] if q_shape and isinstance(q_shape[-1], int) else None
    if r == 4:
        heads = next((d for d in (q_shape[1] if len(q_shape) == 4 else None, shape[1], tq.heads,
                                  _probe_heads(g, q)) if isinstance(d, int)), None)
        layout = "BHSD"
    else:
        heads = tq.heads or _probe_heads(g, q)
        layout = "(BH)SD"
    kv_heads = tk.kv_heads or tv.kv_heads or heads
    if any(math.isnan(s) or s <= 0 for s in (scale,)):
        raise _fail(g, qk, "a positive scale", f"{scale}")
    terms = [t for t in terms if not _no_op_term(g, t)]
    mask = classify_mask(g, terms, False)
    causal = mask in ("causal", "causal+padding")
    if mask == "causal":  # the terms are exactly the causal pattern: the flag says it all
        terms = []
    return AttentionSite(
        name=f"attn{index}", spelling=f"explicit-{g.kind}", q=q, k=kt, v=v, output=g.outputs(pv)[0], scale=scale,
        causal=causal, mask=mask, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        layout=layout, k_transposed=True, mask_terms=terms, dtype=g.dtype(q), anchor=softmax,
        nodes=[g.node_name(n) for n in covered], extra={"value_dim": v_shape[-1] if v_shape else None})


# ----------------------------------------------------------------------------------------------------------------
# fused ops
# ----------------------------------------------------------------------------------------------------------------

def _sdpa_site(g: GraphView, node: Any, index: int) -> AttentionSite:
    canon = g.canon(node)
    q, k, v, mask = canon.inputs
    if canon.attrs["dropout"] > 0:
        raise _fail(g, node, "dropout_p = 0", f"dropout_p = {canon.attrs['dropout']}")
    q_shape, k_shape = g.shape(q), g.shape(k)
    if q_shape is None or len(q_shape) != 4:
        raise _fail(g, node, "4-D (B, H, S, D) query", f"shape {q_shape}")
    head_dim = q_shape[-1] if isinstance(q_shape[-1], int) else None
    scale = canon.attrs["scale"]
    if scale is None:
        if head_dim is None:
            raise _fail(g, node, "a static head dim (for the default scale)", f"shape {q_shape}")
        scale = head_dim ** -0.5
    terms = []
    if mask is not None:
        terms.append(MaskTerm(mask, "keep" if g.dtype(mask) == "bool" else "add"))
    terms = [t for t in terms if not _no_op_term(g, t)]
    kind = classify_mask(g, terms, canon.attrs["causal"])
    if kind == "causal":
        terms = []
    tk = None
    try:
        tk = _trace_layout(g, k, ["X0", "X1", "T", "F"], "K", node)
    except NoMatch:
        pass
    heads = q_shape[1] if isinstance(q_shape[1], int) else None
    kv_heads = k_shape[1] if k_shape and isinstance(k_shape[1], int) else heads
    if tk is not None and tk.kv_heads:
        kv_heads = tk.kv_heads
    output = g.outputs(node)[0]
    if canon.attrs.get("returns_tuple"):
        getters = [u for u in g.users(output) if g.canon(u) is not None and g.canon(u).kind == "identity"]
        if len(getters) != 1:
            raise _fail(g, node, "only the attention output used", f"users: {_users_desc(g, output)}")
        output = getters[0]
    return AttentionSite(
        name=f"attn{index}", spelling=f"sdpa-{g.kind}", q=q, k=k, v=v, output=output, scale=float(scale),
        causal=canon.attrs["causal"] or kind in ("causal", "causal+padding"), mask=kind, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, layout="BHSD", mask_terms=terms, gqa_in_call=canon.attrs["gqa"],
        dtype=g.dtype(q), anchor=node, nodes=[g.node_name(node)])


def _fused_site(g: GraphView, node: Any, index: int) -> AttentionSite:
    canon = g.canon(node)
    if canon.kind == "sdpa":
        return _sdpa_site(g, node, index)
    attrs = canon.attrs
    if canon.kind == "mha_native":
        heads = attrs["heads"]
        embed = attrs["embed"]
        if attrs["need_weights"]:
            raise _fail(g, node, "need_weights=False", "attention weights requested")
        return AttentionSite(name=f"attn{index}", spelling="mha-native", q=canon.inputs[0], k=canon.inputs[1],
                             v=canon.inputs[2], output=g.outputs(node)[0], scale=(embed // heads) ** -0.5,
                             causal=False, mask="none" if attrs["mask"] is None else "key_padding", heads=heads,
                             kv_heads=heads, head_dim=embed // heads, layout="BSE", anchor=node,
                             nodes=[g.node_name(node)], extra={"fused": True})
    heads = attrs.get("num_heads") or attrs.get("q_num_heads")
    kv_heads = attrs.get("kv_num_heads") or heads
    q_shape = g.shape(canon.inputs[0])
    causal = bool(attrs.get("unidirectional", 0) or attrs.get("is_causal", 0))
    if canon.kind == "onnx_attention":
        if attrs.get("softcap", 0.0):
            raise _fail(g, node, "softcap = 0 (plain softmax)", f"softcap = {attrs['softcap']}")
        if any(g.users(o) or g.is_graph_output(o) for o in g.outputs(node)[1:]):
            raise _fail(g, node, "only the attention output used", "present key/value or QK outputs are used")
        if len(canon.inputs) > 4 and any(v is not None for v in canon.inputs[4:6]):
            raise _fail(g, node, "no past key/value (KV cache)", "past_key/past_value inputs")
    if canon.kind == "onnx_attention" and q_shape is not None and len(q_shape) == 4:
        heads, head_dim = q_shape[1], q_shape[-1]
        kshape = g.shape(canon.inputs[1])
        kv_heads = kshape[1] if kshape else heads
        mask_value = canon.inputs[3] if len(canon.inputs) > 3 else None
        terms = [] if mask_value is None else [MaskTerm(mask_value, "keep" if g.dtype(mask_value) == "bool" else "add")]
        terms = [t for t in terms if not _no_op_term(g, t)]
        kind = classify_mask(g, terms, causal)
        if kind == "causal":
            terms = []
        scale = attrs.get("scale") or (head_dim ** -0.5 if isinstance(head_dim, int) else None)
        if scale is None:
            raise _fail(g, node, "a static head dim (for the default scale)", f"shape {q_shape}")
        return AttentionSite(name=f"attn{index}", spelling="onnx_attention", q=canon.inputs[0], k=canon.inputs[1],
                             v=canon.inputs[2], output=g.outputs(node)[0], scale=float(scale),
                             causal=causal or kind in ("causal", "causal+padding"), mask=kind, heads=heads,
                             kv_heads=kv_heads, head_dim=head_dim, layout="BHSD", mask_terms=terms, anchor=node,
                             nodes=[g.node_name(node)], dtype=g.dtype(canon.inputs[0]))
    else:
        hidden = q_shape[-1] if q_shape else None
        if canon.kind == "ort_attention":
            wshape = g.shape(canon.inputs[1])
            hidden = wshape[-1] // 3 if wshape and isinstance(wshape[-1], int) else None
        head_dim = hidden // heads if isinstance(hidden, int) and heads else None
        layout = "BSE"
    scale = attrs.get("scale") or (head_dim ** -0.5 if head_dim else float("nan"))
    mask_in = {"ort_attention": 1 if len(canon.inputs) > 3 and canon.inputs[3] is not None else 0,
               "ort_mha": 1 if len(canon.inputs) > 4 and canon.inputs[4] is not None else 0,
               "onnx_attention": 1 if len(canon.inputs) > 3 and canon.inputs[3] is not None else 0}[canon.kind]
    mask = ("causal+padding" if causal else "key_padding") if mask_in else ("causal" if causal else "none")
    return AttentionSite(name=f"attn{index}", spelling=canon.kind, q=canon.inputs[0],
                         k=canon.inputs[1] if len(canon.inputs) > 1 else None,
                         v=canon.inputs[2] if len(canon.inputs) > 2 else None, output=g.outputs(node)[0],
                         scale=float(scale), causal=causal, mask=mask, heads=heads, kv_heads=kv_heads,
                         head_dim=head_dim, layout=layout, anchor=node, nodes=[g.node_name(node)],
                         dtype=g.dtype(canon.inputs[0]), extra={"fused": True})


# ----------------------------------------------------------------------------------------------------------------
# classifier heads
# ----------------------------------------------------------------------------------------------------------------

def _linear_weight(g: GraphView, node: Any) -> tuple[int | None, int | None] | None:
    """(in_features, out_features) if ``node`` is a Linear/Gemm/MatMul with a constant 2-D weight."""
    canon = g.canon(node)
    if canon is None:
        return None
    if canon.kind == "linear":
        w = canon.inputs[1]
        shape = g.shape(w)
        if shape is None or len(shape) != 2 or not g.is_constant(w):
            return None
        return (shape[1], shape[0]) if canon.attrs.get("weight_layout") == "out_in" else (shape[0], shape[1])
    if canon.kind == "matmul" and len(canon.inputs) == 2:
        w = canon.inputs[1]
        shape = g.shape(w)
        if shape is None or len(shape) != 2 or not g.is_constant(w):
            return None
        return shape[0], shape[1]
    return None


def find_heads(g: GraphView, outputs: list[Any]) -> tuple[list[ClassifierHead], set]:
    """Classifier heads feeding graph ``outputs``, and the ids of softmax nodes they absorb."""
    heads: list[ClassifierHead] = []
    absorbed: set = set()
    for out in outputs:
        value, activation, act_node = out, "none", None
        for _ in range(6):
            node = g.producer(value)
            canon = g.canon(node)
            if canon is None:
                break
            if canon.kind == "softmax" and activation == "none":
                activation, act_node = ("log_softmax" if canon.attrs["log"] else "softmax"), node
                value = canon.inputs[0]
                continue
            if canon.kind in _PASS_THROUGH or canon.kind == "reshape":
                value = canon.inputs[0]
                continue
            if canon.kind == "add":  # MatMul + Add(bias)
                a, b = canon.inputs[:2]
                inner = a if g.is_constant(b) else (b if g.is_constant(a) else None)
                if inner is not None and _linear_weight(g, g.producer(inner)) is not None:
                    value = inner
                    continue
            dims = _linear_weight(g, node)
            out_shape = g.shape(g.outputs(node)[0])
            final_shape = g.shape(out)
            if dims is not None and isinstance(dims[1], int) and dims[1] >= 2 and out_shape is not None \
                    and len(out_shape) == 2 and final_shape is not None and len(final_shape) == 2:
                heads.append(ClassifierHead(name=f"head{len(heads)}", node=g.node_name(node), in_features=dims[0],
                                            num_classes=dims[1], activation=activation, output=g.value_name(out)))
                if act_node is not None:
                    absorbed.add(id(act_node))
            break
    return heads, absorbed


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------

def recognize(g: GraphView, graph_outputs: list[Any] | None = None) -> Recognition:
    """Find every attention site, classifier head and unmatched softmax in ``g`` (one pass over the nodes)."""
    result = Recognition()
    softmaxes = []
    for node in g.nodes():
        canon = g.canon(node)
        if canon is None:
            op = g.op_name(node)
            if "::" in op and not op.startswith("com.microsoft::"):
                result.unknown_ops[op] = result.unknown_ops.get(op, 0) + 1
            continue
        if canon.kind == "softmax":
            softmaxes.append(node)
        elif canon.kind in _FUSED:
            try:
                result.attention_sites.append(_fused_site(g, node, len(result.attention_sites)))
            except NoMatch as miss:
                result.unmatched.append((g.node_name(node), miss.reason))
    result.softmax_count = len(softmaxes)
    if graph_outputs is not None:
        result.heads, absorbed = find_heads(g, graph_outputs)
    else:
        absorbed = set()
    for node in softmaxes:
        if id(node) in absorbed:
            continue
        canon = g.canon(node)
        if canon.attrs["log"]:
            result.unmatched.append((g.node_name(node), Reason(g.node_name(node), g.op_name(node),
                                                               "softmax (not log-softmax) inside attention",
                                                               "a log-softmax that is not a classifier output")))
            continue
        try:
            result.attention_sites.append(_explicit_site(g, node, len(result.attention_sites)))
        except NoMatch as miss:
            result.unmatched.append((g.node_name(node), miss.reason))
    return result
