"""Masks: what a site masks (its kind, from the provenance of its mask terms), and which terms mask nothing."""
from __future__ import annotations

from typing import Any

from ..graph.base import GraphView, walk_ancestors
from ..sites import MaskTerm
from .common import ARANGE_SEARCH, BROADCAST_STEPS, MASK_PROVENANCE_STEPS, NEG_FILL, Spelling, fail

#: Ops a constant mask may be broadcast through and stay the same constant.
_BROADCAST = ("expand", "reshape", "cast", "identity", "unsqueeze")

#: How mask kinds are read (documentation rows for ``softswap inspect --spellings``; the logic is below).
MASK_SPELLINGS: tuple[Spelling, ...] = (
    Spelling("mask", ("compare",), "causal-compare", "a comparison of two arange-derived operands (an arange "
             "folded to a constant 0..n-1 counts): causal"),
    Spelling("mask", ("trilu",), "causal-trilu", "a triangle op (triu / tril / Trilu) in the mask's data: causal"),
    Spelling("mask", ("constant",), "causal-constant", "a constant strictly-upper-triangular drop pattern: causal"),
    Spelling("mask", ("input",), "key-padding", "depends on a graph input of shape (B, T) or (B, .., 1, T)"),
    Spelling("mask", ("input",), "arbitrary", "depends on any other graph input: additive (float) or boolean"),
    Spelling("mask", ("compare",), "all-true", "arange(...) >= 0 or a constant of Trues / zeros: no mask (dropped)"),
)


def _arange_like(g: GraphView, value: Any) -> bool:
    """``value`` comes from an ``arange``, or is a constant 0, 1, …, n-1 along one axis (an arange an exporter
    folded at a static length)."""
    if any(g.canon(n) is not None and g.canon(n).kind == "arange"
           for n in walk_ancestors(g, [value], limit=ARANGE_SEARCH)):
        return True
    v = value
    for _ in range(ARANGE_SEARCH):  # an arange shifted or reshaped: i + (T - S), unsqueeze(arange)
        canon = g.canon(g.producer(v))
        if canon is None or canon.kind not in ("add", "sub", "unsqueeze", "reshape", "cast", "identity", "arange"):
            break
        if canon.kind == "arange":
            return True
        v = canon.inputs[0]
    import numpy as np
    arr = g.const_array(value, 1 << 16)
    if arr is None or arr.size < 2 or arr.dtype.kind not in "iu" or max(arr.shape) != arr.size:
        return False
    return bool(np.array_equal(arr.reshape(-1), np.arange(arr.size)))


def data_sources(g: GraphView, value: Any) -> tuple[list[Any], bool]:
    """Graph inputs that ``value`` depends on through data (not through shapes), and whether a causal
    comparison (two arange-derived operands) or a triangle op appears on the way."""
    inputs: list[Any] = []
    causal = False
    seen: set = set()
    stack = [value]
    steps = 0
    while stack and steps < MASK_PROVENANCE_STEPS:
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
            arange_sides = sum(_arange_like(g, x) for x in canon.inputs[:2] if x is not None
                               and not isinstance(x, (int, float, bool)))
            if arange_sides == 2:
                causal = True
        stack.extend(x for x in g.raw_inputs(node))
    return inputs, causal


def uniform_source(g: GraphView, value: Any) -> Any | None:
    """The small constant ``value`` broadcasts from (through expand/reshape/cast/identity), or None."""
    for _ in range(BROADCAST_STEPS):
        arr = g.const_array(value, 1 << 16)
        if arr is not None:
            return arr
        canon = g.canon(g.producer(value))
        if canon is None or canon.kind not in _BROADCAST:
            return None
        value = canon.inputs[0]
    return None


def always_true(g: GraphView, value: Any) -> bool:
    """A boolean mask that is True everywhere: a constant of Trues, or ``arange(...) >= 0`` (HF ViT's mask)."""
    arr = uniform_source(g, value)
    if arr is not None:
        return bool(arr.size) and bool(arr.astype(bool).all())
    for _ in range(BROADCAST_STEPS):
        canon = g.canon(g.producer(value))
        if canon is None:
            return False
        if canon.kind in _BROADCAST:
            value = canon.inputs[0]
            continue
        if canon.kind == "compare" and canon.attrs["op"] in ("ge", "gt"):
            a, b = canon.inputs[:2]
            for _ in range(BROADCAST_STEPS):  # arange through unsqueeze / expand / "+ 0"
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


def no_op_term(g: GraphView, term: MaskTerm) -> bool:
    """A mask term that masks nothing (all-true keep mask, all-zero additive mask) and can be dropped."""
    if term.mode == "keep":
        return always_true(g, term.value)
    if term.mode == "add":
        arr = uniform_source(g, term.value)
        if arr is not None:
            return bool((arr == 0).all())
        canon = g.canon(g.producer(term.value))
        if canon is not None and canon.kind == "where":
            cond, a, b = canon.inputs[:3]
            return g.scalar(a) == 0 and always_true(g, cond)
    return False


def drop_no_op_terms(g: GraphView, terms: list[MaskTerm]) -> list[MaskTerm]:
    return [t for t in terms if not no_op_term(g, t)]


def _triangular(arr: Any, mode: str) -> bool:
    """A constant (…, S, T) mask whose drop pattern is exactly bottom-right aligned causal (key j dropped for
    query i iff j > i + T - S; S <= T). For S == T this is the strictly upper triangle; a top-left pattern with
    S != T does not match (the site then keeps its mask as an arbitrary one, never a mis-aligned causal)."""
    import numpy as np
    a = np.asarray(arr)
    if a.ndim < 2 or a.shape[-2] > a.shape[-1]:
        return False
    s_len, t_len = a.shape[-2], a.shape[-1]
    upper = np.triu(np.ones((s_len, t_len), dtype=bool), 1 + t_len - s_len)
    if mode == "add":
        masked = a < NEG_FILL
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
        sources, causal_ops = data_sources(g, term.value)
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


def _provenance_causal(g: GraphView, terms: list[MaskTerm], causal_flag: bool) -> bool:
    """Whether the site's causality comes from an op flag or from arange/triangle ops (not a verified constant),
    i.e. from something whose alignment is unknown when the query and key lengths differ."""
    return causal_flag or any(data_sources(g, t.value)[1] for t in terms)


def _known_different(s_len: Any, t_len: Any) -> bool:
    return isinstance(s_len, int) and isinstance(t_len, int) and s_len != t_len


def site_mask(g: GraphView, terms: list[MaskTerm], causal_flag: bool, *, anchor: Any = None,
              lengths: tuple[Any, Any] | None = None, flag_align: str = "top_left") -> tuple[str, list[MaskTerm]]:
    """(mask kind, the terms a rewrite must apply): no-op terms dropped; none left when the kind is exactly
    ``causal`` (the causal flag then says it all).

    ``lengths`` = (S, T), the query and key lengths of the site. A causal site with S != T is accepted only when
    its alignment is known to be bottom-right (the replacements' reading: query i sees key j iff j <= i + T - S):
    a constant mask with exactly that pattern. A causal flag (``flag_align``: SDPA's ``is_causal`` and ONNX
    ``Attention`` are top-left) or a mask built from arange comparisons / triangle ops with S != T raises
    :class:`~rewrite.sites.NoMatch` naming ``anchor`` instead of being silently mis-aligned."""
    terms = drop_no_op_terms(g, terms)
    kind = classify_mask(g, terms, causal_flag)
    if (kind in ("causal", "causal+padding") and lengths is not None and _known_different(*lengths)
            and anchor is not None and _provenance_causal(g, terms, causal_flag)):
        s_len, t_len = lengths
        source = (f"the op's causal flag ({flag_align.replace('_', '-')} aligned)" if causal_flag
                  else "arange comparisons / a triangle op, whose alignment cannot be read from the graph")
        raise fail(g, anchor, "a causal site with query length == key length, or with S != T a constant "
                   "bottom-right aligned mask (key j visible from query i iff j <= i + T - S)",
                   f"query length {s_len} != key length {t_len} with causality from {source}")
    return kind, ([] if kind == "causal" else terms)
