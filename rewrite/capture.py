"""Capture the tensors at attention sites on sample inputs: (q, k, v, mask terms..., original output) per site.

FX: the unlifted module runs under ``torch.fx.Interpreter`` and the site values are read from its environment.
ONNX: the site values are added as graph outputs of a clone and onnxruntime runs it. Used for site-level fidelity
and attention transfer.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx

from .sites import AttentionSite

if TYPE_CHECKING:
    from .io import LoadedModel

log = logging.getLogger(__name__)


def site_values(site: AttentionSite) -> list[Any]:
    """The graph values a site's replacement reads, then the value it replaces."""
    return [site.q, site.k, site.v, *[t.value for t in site.mask_terms], site.output]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            self.seen[n] = out.detach() if isinstance(out, torch.Tensor) else out
        return out


def capture_fx(gm: fx.GraphModule, sites: Sequence[AttentionSite], args: tuple, kwargs: Mapping[str, Any]
               ) -> dict[str, list[torch.Tensor]]:
    """Run ``gm`` once and return each site's values (see :func:`site_values`)."""
    wanted = {v for s in sites for v in site_values(s) if isinstance(v, fx.Node)}
    rec = _Recorder(gm, wanted)
    flat = torch.utils._pytree.tree_leaves((args, dict(kwargs)))
    with torch.no_grad():
        rec.run(*flat)
    return {s.name: [rec.seen[v] for v in site_values(s)] for s in sites}


def capture_onnx(model: ir.Model, sites: Sequence[AttentionSite], feeds: Mapping[str, np.ndarray],
                 source: str | None = None) -> dict[str, list[torch.Tensor]]:
    """Run ``model`` in onnxruntime with each site's values exposed as extra outputs. onnxruntime failures raise
    :class:`~rewrite.errors.UnsupportedModelError` naming ``source`` (the model file) and the node."""
    from .io import ort_run, ort_session
    clone = model.clone()
    by_name = {v.name: v for n in clone.graph for v in n.outputs}
    by_name.update({v.name: v for v in clone.graph.inputs})
    existing = {o.name for o in clone.graph.outputs}
    order: dict[str, list[str]] = {}
    for site in sites:
        names = []
        for value in site_values(site):
            names.append(value.name)
            if value.name not in existing and value.name in by_name and not by_name[value.name].is_graph_input():
                clone.graph.outputs.append(by_name[value.name])
                existing.add(value.name)
        order[site.name] = names
    session = ort_session(clone, source=source)
    out_names = [o.name for o in session.get_outputs()]
    results = dict(zip(out_names, ort_run(session, feeds, clone, source)))
    results.update({k: v for k, v in feeds.items()})
    return {s: [torch.from_numpy(np.asarray(results[n]).copy()) for n in names] for s, names in order.items()}


# ------------------------------------------------------------------------------------------------------------
# Any graph values over a data set (classifier-head features, feature taps)
# ------------------------------------------------------------------------------------------------------------
def static_batch(model: "LoadedModel") -> int | None:
    """The batch size fixed by the model's first input (axis 0 an int in the graph), or None when it is free."""
    if model.kind == "fx":
        user = {s.arg.name for s in model.ep.graph_signature.input_specs
                if s.kind == torch.export.graph_signature.InputKind.USER_INPUT}
        for node in model.ep.graph.nodes:
            if node.op == "placeholder" and node.name in user:
                val = node.meta.get("val")
                if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], int):
                    return int(val.shape[0])
                return None
        return None
    first = model.onnx.graph.inputs[0] if model.onnx.graph.inputs else None
    if first is None or first.shape is None or len(first.shape) == 0:
        return None
    dim = first.shape[0]
    return int(dim) if isinstance(dim, int) else None


def capture_values(model: "LoadedModel", graph: Any, values: Sequence[Any], feeds: Mapping[str, np.ndarray],
                   batch: int = 256) -> list[np.ndarray]:
    """The values ``values`` (graph handles of ``graph``: ``fx.Node`` of ``graph.gm`` or ``onnx_ir.Value`` of
    ``graph.model``) over every sample of ``feeds`` (arrays keyed by input name, samples on axis 0), concatenated
    along axis 0. Runs in chunks of ``batch`` samples; a model with a fixed batch size runs in chunks of that size,
    the last one padded by repeating its final sample (the padding rows are dropped). FX runs in torch eager
    (``torch.no_grad``), ONNX in onnxruntime with the values exposed as extra outputs.
    """
    names = list(model.input_names)
    n = next(iter(feeds.values())).shape[0]
    fixed = static_batch(model)
    step = fixed or batch
    chunks: list[list[np.ndarray]] = [[] for _ in values]
    session = None
    if model.kind == "onnx":
        session, out_names = _values_session(graph.model, values, model.source)
    for start in range(0, n, step):
        part = {k: np.asarray(feeds[k][start:start + step]) for k in names}
        rows = next(iter(part.values())).shape[0]
        if fixed and rows < fixed:
            part = {k: np.concatenate([v, np.repeat(v[-1:], fixed - rows, axis=0)]) for k, v in part.items()}
        if model.kind == "fx":
            got = _values_fx(model, graph.gm, values, part)
        else:
            from .io import ort_run
            results = dict(zip([o.name for o in session.get_outputs()],
                               ort_run(session, part, graph.model, model.source)))
            results.update(part)
            got = [np.asarray(results[name]) for name in out_names]
        for sink, arr in zip(chunks, got):
            sink.append(arr[:rows] if arr.ndim and arr.shape[0] >= rows else arr)
    return [np.concatenate(parts, axis=0) for parts in chunks]


def _values_fx(model: "LoadedModel", gm: fx.GraphModule, values: Sequence[fx.Node],
               part: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    wanted = set(values)
    rec = _Recorder(gm, wanted)
    dtypes = {n: t.dtype for n, t in model.example_inputs.items() if isinstance(t, torch.Tensor)}
    leaves = [torch.as_tensor(part[n]).to(dtypes.get(n, torch.as_tensor(part[n]).dtype)) for n in model.input_names]
    with torch.no_grad():
        rec.run(*leaves)
    return [rec.seen[v].detach().float().numpy() if rec.seen[v].dtype == torch.bfloat16 else rec.seen[v].numpy()
            for v in values]


def _values_session(model: ir.Model, values: Sequence[Any], source: str | None) -> tuple[Any, list[str]]:
    from .io import ort_session
    clone = model.clone()
    by_name = {v.name: v for n in clone.graph for v in n.outputs}
    inputs = {v.name for v in clone.graph.inputs}
    existing = {o.name for o in clone.graph.outputs}
    names = []
    for value in values:
        names.append(value.name)
        if value.name not in existing and value.name not in inputs:
            clone.graph.outputs.append(by_name[value.name])
            existing.add(value.name)
    return ort_session(clone, source=source), names
