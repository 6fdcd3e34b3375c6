"""Layout check: carry the axis roles of a matmul operand back to where the tensor was made.

Each operand of the two attention matmuls gets a role per axis (batch labels ``X0, X1``, tokens ``T``, features
``F``); the roles are carried back through transposes, selects and reshapes to where the tensor was made. There,
the features must be the last axis and the tokens the axis before it — or, at a head-splitting reshape
(``(.., E) → (.., H, F)``), the heads (a batch label) must sit just before the features with the tokens further
left. This catches a permute mistaken for a transpose (heads exchanged with token positions), a wrong match that
would otherwise compute nonsense with the right shapes.

Each accepted step is a row of :data:`LAYOUT_STEPS_TABLE`; a handler returns ``NEXT`` (walk on from
``state.value``), ``STOP`` (the tensor is made here: check the roles) or ``DONE`` (checked at a head split).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..graph.base import GraphView
from .common import LAYOUT_STEPS, PASS_THROUGH, Spelling, by_kind, fail, kind_of, scalar_scale

NEXT, STOP, DONE = "next", "stop", "done"


@dataclass
class Trace:
    """Where an operand was made, and the heads / KV heads read on the way (None when not seen)."""

    source: Any
    heads: int | None = None
    kv_heads: int | None = None


@dataclass
class _State:
    g: GraphView
    value: Any
    roles: list[str]
    what: str
    anchor: Any
    trace: Trace
    saw_expand: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _pass_through(st: _State, node: Any, canon: Any) -> str:
    st.value = canon.inputs[0]
    return NEXT


def _dropout(st: _State, node: Any, canon: Any) -> str:
    if canon.attrs["p"] == 0 or not canon.attrs["train"]:
        st.value = canon.inputs[0]
        return NEXT
    return STOP


def _scale(st: _State, node: Any, canon: Any) -> str:
    scaled = scalar_scale(st.g, canon)
    if scaled is None:
        return STOP
    st.value = scaled[0]
    return NEXT


def _transpose(st: _State, node: Any, canon: Any) -> str:
    perm = canon.attrs["perm"]
    if len(perm) != len(st.roles):
        return STOP
    back = [""] * len(perm)
    for i, p in enumerate(perm):
        back[p] = st.roles[i]
    st.roles, st.value = back, canon.inputs[0]
    return NEXT


def _select(st: _State, node: Any, canon: Any) -> str:
    axis = canon.attrs["axis"]
    st.roles = st.roles[:axis] + ["SEL"] + st.roles[axis:]
    st.value = canon.inputs[0]
    return NEXT


def _slice(st: _State, node: Any, canon: Any) -> str:
    st.value = canon.inputs[0]
    return NEXT


def _expand(st: _State, node: Any, canon: Any) -> str:
    st.saw_expand = True
    st.value = canon.inputs[0]
    return NEXT


def _unsqueeze(st: _State, node: Any, canon: Any) -> str:
    if not st.saw_expand:
        return STOP
    src_shape = st.g.shape(canon.inputs[0])
    if src_shape is not None and len(src_shape) == 4 and isinstance(src_shape[1], int):
        st.trace.kv_heads = src_shape[1]
    st.value = canon.inputs[0]
    st.roles = [r for r in st.roles if r != "SEL"]
    # the inserted axis carried a repeat; drop one batch label to get back to the source rank
    if len(st.roles) > (len(src_shape) if src_shape else len(st.roles)):
        st.roles = st.roles[:len(st.roles) - 3] + st.roles[-2:]
    return NEXT


def _size1_relabel(in_shape: Any, out_shape: Any) -> list[int | None] | None:
    """For a reshape that only inserts, drops or moves axes of size 1 (the other dims equal and in the same order):
    for each input axis, the output axis holding the same data (None for a size-1 axis with no partner). Such a
    reshape is a transpose (one KV head moved next to the tokens) or an unsqueeze / squeeze. None otherwise."""
    if in_shape == out_shape or any(d is None for d in (*in_shape, *out_shape)):
        return None
    rest_in = [i for i, d in enumerate(in_shape) if d != 1]
    rest_out = [i for i, d in enumerate(out_shape) if d != 1]
    if [in_shape[i] for i in rest_in] != [out_shape[i] for i in rest_out]:
        return None
    ones_in = [i for i, d in enumerate(in_shape) if d == 1]
    ones_out = [i for i, d in enumerate(out_shape) if d == 1]
    back: list[int | None] = [None] * len(in_shape)
    for i, o in zip(rest_in, rest_out):
        back[i] = o
    if len(ones_in) == len(ones_out):
        for i, o in zip(ones_in, ones_out):
            back[i] = o
    return back


def _reorders_axes(in_shape: Any, out_shape: Any) -> bool:
    """A reshape whose output dims are its input dims in another order (not only size-1 axes moved): it
    reinterprets the data as if transposed, the classic ``view`` in place of ``transpose`` bug."""
    if len(in_shape) != len(out_shape) or any(d is None for d in (*in_shape, *out_shape)):
        return False
    if sorted(map(str, in_shape)) != sorted(map(str, out_shape)):
        return False
    return [d for d in in_shape if d != 1] != [d for d in out_shape if d != 1]


def _reshape(st: _State, node: Any, canon: Any) -> str:
    g, roles = st.g, st.roles
    out_shape, in_shape = g.shape(st.value), g.shape(canon.inputs[0])
    if kind_of(g, g.producer(canon.inputs[0])) == "expand" and len(roles) >= 3:
        # GQA repeat_kv: (B, Hkv, n, T, D) -> (B, H, T, D)
        st.roles = roles[:-3] + [roles[-3], "X_rep"] + roles[-2:]
        st.value = canon.inputs[0]
        return NEXT
    if out_shape is None or in_shape is None or len(in_shape) < 2 or len(out_shape) < 2:
        return STOP
    if out_shape[-1] is not None and out_shape[-1] == in_shape[-1] and out_shape[-2] is not None \
            and out_shape[-2] == in_shape[-2]:  # merges or splits batch axes only
        st.roles = [f"X{i}" for i in range(len(in_shape) - 2)] + roles[-2:]
        st.value = canon.inputs[0]
        return NEXT
    back = _size1_relabel(in_shape, out_shape)
    if back is not None and len(out_shape) == len(roles):  # only size-1 axes moved (one KV head) or added
        st.roles = [roles[o] if o is not None else "X_1" for o in back]
        st.value = canon.inputs[0]
        return NEXT
    if _reorders_axes(in_shape, out_shape):
        raise fail(g, st.anchor, f"{st.what}: axes moved by a transpose, not by a reshape",
                   f"reshape {tuple(in_shape)} → {tuple(out_shape)} at {g.node_name(node)}, which reorders axes")
    if not (isinstance(out_shape[-1], int) and isinstance(in_shape[-1], int)) or out_shape[-1] == in_shape[-1]:
        return STOP  # unknown or symbolic dims: cannot prove a head split; check the canonical layout here
    # a head split: (.., E) -> (.., H, F)
    if roles[-1] != "F" or not roles[-2].startswith("X"):
        raise fail(g, st.anchor, f"{st.what}: heads and features in the last two axes of the head split at "
                   f"{g.node_name(node)}, reached by a transpose of the last two axes",
                   f"axis roles {roles} after the permutations")
    left = [r for r in roles[:-2] if r != "SEL"]
    if not left or left[-1] != "T":
        raise fail(g, st.anchor, f"{st.what}: token axis just left of the heads at {g.node_name(node)}, reached "
                   "by a transpose of the last two axes", f"axis roles {roles} after the permutations")
    if isinstance(out_shape[-2], int):
        st.trace.heads = out_shape[-2]
    elif isinstance(in_shape[-1], int) and isinstance(out_shape[-1], int) and out_shape[-1]:
        st.trace.heads = in_shape[-1] // out_shape[-1]
    st.trace.source = st.value
    return DONE


#: How each op between a matmul operand and its source moves the axis roles.
LAYOUT_STEPS_TABLE: tuple[Spelling, ...] = (
    Spelling("layout", PASS_THROUGH, "pass-through", "cast / identity: roles unchanged", _pass_through),
    Spelling("layout", ("dropout",), "dropout", "inactive dropout (p = 0 or eval): roles unchanged", _dropout),
    Spelling("layout", ("mul", "div"), "scalar-scale", "multiply / divide by one constant number: roles unchanged",
             _scale),
    Spelling("layout", ("transpose",), "permute", "transpose / permute with its full permutation: roles permuted",
             _transpose),
    Spelling("layout", ("select",), "select", "select / unbind of a packed QKV axis: that axis dropped", _select),
    Spelling("layout", ("slice",), "slice", "slice (split of a packed QKV): roles unchanged", _slice),
    Spelling("layout", ("expand",), "expand", "expand (broadcast, GQA repeat): roles unchanged", _expand),
    Spelling("layout", ("unsqueeze",), "gqa-unsqueeze",
             "unsqueeze under an expand (GQA repeat_kv): the repeat axis dropped, KV heads read", _unsqueeze),
    Spelling("layout", ("reshape",), "gqa-repeat", "reshape of an expand (B, Hkv, n, T, D) → (B, H, T, D)", _reshape),
    Spelling("layout", ("reshape",), "batch-merge", "reshape keeping the last two axes (batch axes merged / split)"),
    Spelling("layout", ("reshape",), "size1-move",
             "reshape that only moves, inserts or drops axes of size 1 (one KV head, multi-query attention): a "
             "transpose / unsqueeze; a reshape reordering larger axes is refused"),
    Spelling("layout", ("reshape",), "head-split",
             "reshape (.., E) → (.., H, F) with heads just before features and tokens left of the heads (checked)"),
)
_BY_KIND = by_kind(LAYOUT_STEPS_TABLE)


def trace_layout(g: GraphView, value: Any, roles: list[str], what: str, anchor: Any) -> Trace:
    """Carry axis ``roles`` of ``value`` back to where the tensor was made, and check them there (module doc)."""
    st = _State(g, value, roles, what, anchor, Trace(source=value))
    for _ in range(LAYOUT_STEPS):
        node = g.producer(st.value)
        canon = g.canon(node)
        if canon is None:
            break
        rows = _BY_KIND.get(canon.kind)
        handler = next((r.handler for r in rows if r.handler is not None), None) if rows else None
        if handler is None:
            break
        step = handler(st, node, canon)
        if step == DONE:
            return st.trace
        if step == STOP:
            break
    st.trace.source = st.value
    roles = st.roles
    if roles[-1] != "F" or roles[-2] != "T":
        perm_hint = "; permuted so that heads and token positions are exchanged" if "T" in roles else ""
        raise fail(g, anchor, f"{what} with tokens then features in its last two axes (…, T, F), reached by a "
                   f"transpose of the last two axes",
                   f"axis roles {roles} at {g.value_name(st.value)}{perm_hint}")
    return st.trace
