"""What every recognizer shares: named walk bounds, the spelling table type, failure reasons, scalar scales.

An accepted spelling is a :class:`Spelling` row of a table: the canonical op kinds it applies to, a tag, one line
saying what it accepts, and the handler that checks it (raising :class:`~rewrite.sites.NoMatch` with a reason when
the op has the right kind but the wrong form). ``softswap inspect --spellings`` prints every table (see
:func:`rewrite.recognize.spellings`), so what the engine accepts is data that can be listed and tested.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..graph.base import GraphView
from ..sites import NoMatch, Reason

# ---------------------------------------------------------------------------------------------------------------
# Walk bounds. Every walk is bounded so recognition stays linear in graph size; each bound is a few times the
# longest chain seen in real exports.
# ---------------------------------------------------------------------------------------------------------------
#: Ops between an operand of a score / P·V matmul and the reshape or input that made it (layout trace).
LAYOUT_STEPS = 24
#: Ops between the softmax and the Q·Kᵀ matmul (scale, masks, casts, a batch-merge view).
SCORE_STEPS = 16
#: Ops between the softmax and the P·V matmul (casts, dropout, NaN / safe-softmax guards, broadcast views).
PROB_STEPS = 8
#: Scalar factors stacked on one matmul operand (``q * a / b``).
SCALE_STEPS = 8
#: Ops between a classifier output and its Linear / Gemm (softmax, casts, reshape, bias add).
HEAD_STEPS = 6
#: Depth of the search from a mask or scores operand down to the Q·Kᵀ matmul.
MATMUL_REACH_DEPTH = 6
#: Ancestors searched for an ``arange`` on each side of a comparison (causal-mask provenance).
ARANGE_SEARCH = 12
#: Values visited when tracing a mask back to the graph inputs it depends on.
MASK_PROVENANCE_STEPS = 300
#: Broadcast / cast ops between a mask and the constant it expands from.
BROADCAST_STEPS = 8
#: Ops between a projection and its head-splitting reshape when counting heads (through RoPE and the like).
HEAD_PROBE_STEPS = 16

#: A mask value at or below this masks a score out (fills, additive masks, key-padding derivation).
NEG_FILL = -1e3
#: Canonical kinds that change neither values nor layout.
PASS_THROUGH = ("cast", "identity")


@dataclass(frozen=True)
class Spelling:
    """One accepted spelling: the step of recognition it belongs to, the canonical kinds it applies to, a short tag,
    what it accepts (one line), and the handler that checks it. ``handler`` is ``None`` for rows that document a
    check done inline (a bound or a condition rather than an op)."""

    step: str
    kinds: tuple[str, ...]
    tag: str
    accepts: str
    handler: Callable[..., Any] | None = None

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "kinds": list(self.kinds), "tag": self.tag, "accepts": self.accepts}


def by_kind(rows: Iterable[Spelling]) -> dict[str, list[Spelling]]:
    """Index a spelling table by canonical kind (rows keep their table order within a kind)."""
    out: dict[str, list[Spelling]] = {}
    for row in rows:
        for kind in row.kinds:
            out.setdefault(kind, []).append(row)
    return out


def fail(g: GraphView, node: Any, expected: str, found: str) -> NoMatch:
    """The :class:`NoMatch` naming ``node``, what was expected and what was found."""
    return NoMatch(Reason(node=g.node_name(node), op=g.op_name(node), expected=expected, found=found))


def users_desc(g: GraphView, value: Any) -> str:
    names = [f"{g.node_name(u)} ({g.op_name(u)})" for u in g.users(value)]
    if g.is_graph_output(value):
        names.append("a graph output")
    return ", ".join(names) or "nothing"


def kind_of(g: GraphView, node: Any) -> str | None:
    """The canonical kind of ``node`` (None for ops outside the vocabulary and for graph inputs)."""
    canon = g.canon(node) if node is not None else None
    return canon.kind if canon is not None else None


def scalar_scale(g: GraphView, canon: Any) -> tuple[Any, float] | None:
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


def strip_scale(g: GraphView, value: Any) -> tuple[Any, float]:
    """``value`` without the scalar factors stacked on it (also under a copy: ``clone(q * s)``), and their
    product."""
    factor = 1.0
    for _ in range(SCALE_STEPS):
        canon = g.canon(g.producer(value))
        scaled = scalar_scale(g, canon)
        if scaled is None and canon is not None and canon.kind == "identity":
            scaled = scalar_scale(g, g.canon(g.producer(canon.inputs[0])))
        if scaled is None:
            break
        value, f = scaled
        factor *= f
    return value, factor
