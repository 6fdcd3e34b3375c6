"""FX emitter: splice :class:`~rewrite.binding.SiteModule` calls into an unlifted program and re-export it.

The program returned is plain ATen (the site modules are traced through), keeps dynamic dims dynamic, and keeps
the new parameters as trainable parameters. ``meta["val"]`` of every node is recomputed by the re-export, so later
passes never go blind.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.fx as fx

from .errors import UnsupportedModelError
from .io import LoadedModel
from .sites import AttentionSite

log = logging.getLogger(__name__)


def _example_call(loaded: LoadedModel) -> tuple[tuple, dict]:
    ep = loaded.ep
    if getattr(ep, "example_inputs", None) is not None:
        args, kwargs = ep.example_inputs
        return tuple(args), dict(kwargs)
    if not loaded.example_inputs:
        raise UnsupportedModelError(f"{loaded.source}: the program carries no example inputs; pass example_inputs")
    return (), dict(loaded.example_inputs)


def _dynamic_shapes(loaded: LoadedModel, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    """Mark as ``Dim.AUTO`` every input axis that is symbolic in the original program."""
    placeholders = [n for n in loaded.ep.graph.nodes if n.op == "placeholder"]
    user = {s.arg.name for s in loaded.ep.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT}
    vals = [n.meta.get("val") for n in placeholders if n.name in user]
    tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    collection = torch.export.ShapesCollection()
    dynamic = False
    for tensor, val in zip(tensors, vals):
        if not isinstance(val, torch.Tensor):
            continue
        axes = {i: torch.export.Dim.AUTO for i, d in enumerate(val.shape) if not isinstance(d, int)}
        if axes:
            collection[tensor] = axes
            dynamic = True
    return collection.dynamic_shapes(gm, args, kwargs) if dynamic else None


def splice(gm: fx.GraphModule, sites: Sequence[tuple[AttentionSite, torch.nn.Module]]) -> None:
    """Insert one ``call_module`` per site before the site's output node and route the output's users to it."""
    graph = gm.graph
    for site, module in sites:
        name = f"softswap_{site.name}"
        gm.add_submodule(name, module)
        anchor: fx.Node = site.output
        inputs = (site.q, site.k, site.v, *[t.value for t in site.mask_terms])
        with graph.inserting_before(anchor):
            new = graph.call_module(name, args=inputs)
        new.meta["rw.rule"] = f"attention:{site.name}"
        anchor.replace_all_uses_with(new)
    # the replaced chains: dropout and fused ops count as impure (seeded randomness), so dead-code elimination
    # would keep them and the old softmax with them; erase what the sites covered once nothing uses it
    covered = {name for site, _ in sites for name in (*site.nodes, getattr(site.output, "name", None))}
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.name in covered and not node.users:
            graph.erase_node(node)
    _drop_orphan_assertions(graph)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()


_ASSERTIONS = (torch.ops.aten._assert_tensor_metadata.default,)


def _drop_orphan_assertions(graph: fx.Graph) -> None:
    """Erase metadata assertions on values that nothing but assertions uses any more (they pin dead nodes)."""
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.target in _ASSERTIONS and node.args and isinstance(node.args[0], fx.Node):
                subject = node.args[0]
                if all(u.target in _ASSERTIONS for u in subject.users):
                    for u in list(subject.users):
                        graph.erase_node(u)
                    changed = True


def reexport(loaded: LoadedModel, gm: fx.GraphModule) -> Any:
    """``torch.export`` the edited module again with the original example inputs and dynamic axes."""
    args, kwargs = _example_call(loaded)
    dynamic = _dynamic_shapes(loaded, gm, args, kwargs)
    from .errors import first_line
    from .interrupts import reraise_if_interrupted
    try:
        return torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # specialisation conflicts: fall back to static shapes, say so (never on Ctrl-C)
        reraise_if_interrupted(exc)
        if dynamic is None:
            raise UnsupportedModelError(f"{loaded.source}: re-export of the rewritten program failed "
                                        f"({first_line(exc)})") from exc
        log.warning("%s: re-export with dynamic axes failed (%s); exporting with static shapes", loaded.source,
                    first_line(exc))
    try:
        return torch.export.export(gm, args, kwargs, strict=False)
    except Exception as exc:
        reraise_if_interrupted(exc)
        raise UnsupportedModelError(f"{loaded.source}: re-export of the rewritten program failed "
                                    f"({first_line(exc)})") from exc
