"""Capture the tensors at attention sites on sample inputs: (q, k, v, mask terms..., original output) per site.

FX: the unlifted module runs under ``torch.fx.Interpreter`` and the site values are read from its environment.
ONNX: the site values are added as graph outputs of a clone and onnxruntime runs it. Used for site-level fidelity
and attention transfer.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx

from .sites import AttentionSite

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
