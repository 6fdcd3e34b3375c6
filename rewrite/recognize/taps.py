"""Feature taps: the graph values an out-of-distribution detector reads (``passes.ood``), with sensible defaults.

Defaults per architecture (every rule is a row of :data:`TAP_SPELLINGS`):

- **CNN stages**: a float (B, C, H, W) value with H·W > 1 used by an op whose float output has another spatial size
  or rank (a pool, a strided conv, a global mean or flatten): the output of the stage right before the resolution
  changes. Only the first such value per spatial size is kept (in a bottleneck block the stage's input also feeds
  the strided conv, and that input is the stage output). Pooled by the spatial mean.
- **Transformer blocks**: the residual stream entering each attention block: the input of the Q projection of every
  attention site (walking up through reshapes, transposes, scales, bias adds). Batch-first (B, T, E); pooled by the
  token mean (or token 0, ``cls``).
- **Penultimate**: the classifier head's input (B, D) (token-pooled when (B, T, E)).

Taps are listed in topological order and named ``tap0, tap1, ...``; :func:`select_taps` applies ``--layers``.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import OptionError
from ..graph.base import GraphView
from ..sites import AttentionSite, ClassifierHead, FeatureTap
from .common import HEAD_PROBE_STEPS, Spelling
from .heads import linear_weight

#: Float dtypes a tap may have (names as the graph adapters spell them).
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: Canonical kinds walked through from a Q operand up to its projection (values unchanged up to layout / scale).
_Q_WALK = ("transpose", "reshape", "identity", "cast", "dropout", "mul", "div", "select", "add")
#: Pooling of a (B, T, E) tap: the token mean or token 0.
TOKEN_POOLS = ("mean", "cls")

TAP_SPELLINGS: tuple[Spelling, ...] = (
    Spelling("feature tap", ("any",), "stage", "CNN stage output: a float (B, C, H, W) value, H·W > 1, used by an op "
             "whose float output has another spatial size or rank; the first per spatial size; pooled by spatial mean; "
             "not an attention operand (made by or used by a matmul, transpose, softmax or fused attention)"),
    Spelling("feature tap", _Q_WALK + ("linear", "matmul"), "block", "transformer residual stream entering an "
             "attention block: the input of the site's Q projection (through reshape, transpose, scale, bias add), "
             "batch-first (B, T, E); pooled by token mean or token 0 (cls)"),
    Spelling("feature tap", ("linear", "matmul"), "penultimate", "the classifier head's input: (B, D) as is, "
             "(B, T, E) token-pooled"),
)


def _float(g: GraphView, value: Any) -> bool:
    return g.dtype(value) in FLOAT_DTYPES


def _features(shape: tuple[Any, ...] | None, pool: str) -> int | None:
    if shape is None:
        return None
    dim = shape[1] if pool == "spatial_mean" else shape[-1]
    return int(dim) if isinstance(dim, int) else None


#: Canonical kinds that make a rank-4 value an attention operand rather than a CNN feature map.
_NOT_STAGE = ("matmul", "transpose", "softmax", "sdpa", "mha_native", "ort_attention", "ort_mha", "onnx_attention")


def _kind(g: GraphView, node: Any) -> str | None:
    canon = g.canon(node)
    return canon.kind if canon is not None else None


def _stage_values(g: GraphView) -> list[Any]:
    """CNN stage outputs (see the module docstring), in topological order."""
    found: list[Any] = []
    seen_sizes: set[tuple[Any, ...]] = set()
    for node in g.nodes():
        for value in g.outputs(node):
            shape = g.shape(value)
            if shape is None or len(shape) != 4 or not _float(g, value) or g.is_constant(value):
                continue
            spatial = tuple(shape[2:])
            if all(isinstance(d, int) for d in spatial) and spatial[0] * spatial[1] <= 1:
                continue
            if spatial in seen_sizes or _kind(g, node) in _NOT_STAGE:
                continue
            users = g.users(value)
            if any(_kind(g, user) in _NOT_STAGE for user in users):  # (B, H, T, D) attention operands
                continue
            changes = False
            for user in users:
                for out in g.outputs(user):
                    out_shape = g.shape(out)
                    if out_shape is None or not _float(g, out):
                        continue
                    if len(out_shape) != 4 or tuple(out_shape[2:]) != spatial:
                        changes = True
            if changes:
                seen_sizes.add(spatial)
                found.append(value)
    return found


def _projection_input(g: GraphView, value: Any) -> Any | None:
    """The input of the Linear / MatMul (constant weight) that produced ``value`` through layout / scale ops."""
    for _ in range(HEAD_PROBE_STEPS):
        shape = g.shape(value)
        node = g.producer(value)
        canon = g.canon(node) if node is not None else None
        if canon is None:
            return value if shape is not None and len(shape) == 3 else None
        if linear_weight(g, node) is not None:
            return canon.inputs[0]
        if canon.kind not in _Q_WALK:
            return None
        if canon.kind in ("mul", "div", "add"):
            a, b = canon.inputs[:2]
            value = a if (g.is_constant(b) or g.scalar(b) is not None) else (b if g.is_constant(a) else None)
            if value is None:
                return None
        else:
            value = canon.inputs[0]
    return None


def _head_input(g: GraphView, head: ClassifierHead, by_name: dict[str, Any]) -> Any | None:
    if getattr(head, "feature", None) is not None:
        return head.feature
    node = by_name.get(head.node)
    canon = g.canon(node) if node is not None else None
    return canon.inputs[0] if canon is not None and canon.inputs else None


def find_taps(g: GraphView, heads: Sequence[ClassifierHead] = (), sites: Sequence[AttentionSite] = (),
              token_pool: str = "mean") -> list[FeatureTap]:
    """The default feature taps of ``g``: CNN stage outputs, transformer block inputs, the head input (see module
    docstring), in topological order, each value once. ``token_pool``: ``"mean"`` or ``"cls"`` for (B, T, E) taps."""
    if token_pool not in TOKEN_POOLS:
        raise OptionError(f"token_pool={token_pool!r}: expected one of {', '.join(TOKEN_POOLS)}")
    chosen: dict[Any, tuple[Any, str]] = {}
    for value in _stage_values(g):
        chosen.setdefault(g.key(value), (value, "stage"))
    for site in sites:
        x = _projection_input(g, site.q)
        shape = g.shape(x) if x is not None else None
        if x is not None and shape is not None and len(shape) == 3 and _float(g, x) and not g.is_constant(x):
            chosen.setdefault(g.key(x), (x, "block"))
    if heads:
        by_name = {g.node_name(n): n for n in g.nodes()}
        for head in heads:
            x = _head_input(g, head, by_name)
            shape = g.shape(x) if x is not None else None
            if x is not None and shape is not None and len(shape) in (2, 3) and _float(g, x):
                chosen[g.key(x)] = (x, "penultimate")
    order = {g.key(v): i for i, v in enumerate(_node_values(g))}
    taps = []
    for value, role in sorted(chosen.values(), key=lambda item: order.get(g.key(item[0]), -1)):
        shape = g.shape(value)
        pool = {4: "spatial_mean", 3: "token_mean" if token_pool == "mean" else "cls", 2: "none"}[len(shape)]
        producer = g.producer(value)
        node = g.node_name(producer) if producer is not None else g.value_name(value)
        taps.append(FeatureTap(name=f"tap{len(taps)}", node=node, role=role, pool=pool, shape=shape,
                               features=_features(shape, pool), value=value))
    return taps


def _node_values(g: GraphView) -> list[Any]:
    return [v for n in g.nodes() for v in g.outputs(n)]


def select_taps(taps: Sequence[FeatureTap], spec: Any, g: GraphView | None = None,
                token_pool: str = "mean") -> list[FeatureTap]:
    """``--layers``: tap indices (``0,2``, spans ``1-3``), tap names (``tap2``) or node names, comma-separated or a
    list; None keeps every tap. With ``g``, a node name that is not a default tap is accepted when its output is a
    float (B, D), (B, T, E) or (B, C, H, W) value (role ``"chosen"``). :class:`OptionError` names an empty selection,
    an index out of range or an unknown name (listing the taps)."""
    if spec is None:
        return list(taps)
    items = list(spec) if isinstance(spec, (list, tuple, set)) else str(spec).split(",")
    listing = ", ".join(f"{t.name}={t.node}" for t in taps) or "none"
    if not items or any(not str(i).strip() for i in items):
        raise OptionError(f"--layers {spec!r}: empty item (give tap indices like 0,2 or node names; taps: {listing})")
    by_name = {t.name: i for i, t in enumerate(taps)}
    by_name.update({t.node: i for i, t in enumerate(taps)})
    picked: list[int] = []
    for item in items:
        text = str(item).strip()
        if text in by_name:
            index = [by_name[text]]
        elif g is not None and (extra := _tap_at_node(g, text, token_pool, len(taps))) is not None:
            taps = [*taps, extra]
            by_name[text] = len(taps) - 1
            index = [len(taps) - 1]
        else:
            try:
                if "-" in text[1:]:
                    lo, hi = (int(p) for p in text.split("-", 1))
                    if hi < lo:
                        raise OptionError(f"--layers: span {text!r} is reversed (write {hi}-{lo})")
                    index = list(range(lo, hi + 1))
                else:
                    index = [int(text)]
            except ValueError:
                raise OptionError(f"--layers: {text!r} is neither a tap index nor a tap or node name (taps: "
                                  f"{listing})") from None
        for i in index:
            if not 0 <= i < len(taps):
                raise OptionError(f"--layers: tap index {i} is out of range: the model has {len(taps)} feature taps "
                                  f"({listing})")
            if i not in picked:
                picked.append(i)
    chosen = [taps[i] for i in picked]
    if g is not None:
        order = {g.key(v): i for i, v in enumerate(_node_values(g))}
        chosen.sort(key=lambda t: order.get(g.key(t.value), -1))
    else:
        chosen.sort(key=lambda t: taps.index(t))
    return chosen


def _tap_at_node(g: GraphView, name: str, token_pool: str, index: int) -> FeatureTap | None:
    """A tap on the output of the node called ``name``, if it is a float value of rank 2, 3 or 4."""
    node = next((n for n in g.nodes() if g.node_name(n) == name), None)
    if node is None or len(g.outputs(node)) != 1:
        return None
    value = g.outputs(node)[0]
    shape = g.shape(value)
    if shape is None or len(shape) not in (2, 3, 4) or not _float(g, value):
        raise OptionError(f"--layers: node {name!r} has output shape {shape} ({g.dtype(value)}); a feature tap "
                          "needs a float (B, D), (B, T, E) or (B, C, H, W) value")
    pool = {4: "spatial_mean", 3: "token_mean" if token_pool == "mean" else "cls", 2: "none"}[len(shape)]
    return FeatureTap(name=f"tap{index}", node=name, role="chosen", pool=pool, shape=shape,
                      features=_features(shape, pool), value=value)
