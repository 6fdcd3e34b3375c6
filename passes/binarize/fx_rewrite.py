"""Install BiViT modules into an unlifted FX program (``ep.module()``), freeze them, re-export.

:func:`plan` decides per site what is binarised (with reasons), :func:`install` replaces the chosen
``aten.linear`` nodes by ``call_module`` nodes of :class:`~.modules.BinaryLinear` (the original weight and bias
parameters are removed from the module) and splices :class:`~.modules.BinaryAttention` at the attention sites
(stage ``w1a1``), :func:`freeze` swaps every trainable module for its deploy form in place.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from rewrite import emit_fx
from rewrite.sites import AttentionSite

from .locate import BlockLinears, block_linears
from .modules import BinaryAttention, BinaryLinear

log = logging.getLogger(__name__)

STAGES = ("w1a1", "1w32a")
PARTS = ("attention", "mlp")
#: Roles of the Linears per part.
ROLES = {"attention": ("q", "k", "v", "o"), "mlp": ("fc1", "fc2")}


@dataclass
class SitePlan:
    """One attention site: the Linears chosen per role (FX nodes), whether its attention core is binarised, and why
    any part is left float."""

    site: AttentionSite
    linears: dict[str, fx.Node] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)  # part → "binarized" | reason it is not
    core: bool = False
    core_reason: str = ""

    @property
    def replaced(self) -> bool:
        return bool(self.linears) or self.core


def plan(sites: Sequence[AttentionSite], stage: str, parts: Sequence[str], finder: Any = block_linears
         ) -> list[SitePlan]:
    """Per site: the Linears of the selected ``parts`` that match the recognition rule (:mod:`.locate`), and the
    attention core (stage ``w1a1``, part ``attention``, sites without a mask whose q/k/v/o matched). ``finder``
    maps a site to its :class:`~.locate.BlockLinears` (FX: :func:`~.locate.block_linears`; ONNX:
    :func:`~.onnx_rewrite.block_linears_onnx`)."""
    out = []
    for site in sites:
        block: BlockLinears = finder(site)
        sp = SitePlan(site)
        for part in PARTS:
            if part not in parts:
                sp.parts[part] = "not selected (parts option)"
                continue
            found = block.attention if part == "attention" else block.mlp
            if part == "attention" or block.mlp_reason is not None:
                reason = block.attention_reason if part == "attention" else block.mlp_reason
            else:  # the MLP is found from the output projection, which did not match
                reason = f"the MLP is found from the output projection, which did not match ({block.attention_reason})"
            if found and all(r in found for r in ROLES[part]):
                sp.linears.update({r: found[r] for r in ROLES[part]})
                sp.parts[part] = "binarized"
            else:
                sp.parts[part] = f"not matched: {reason}"
        if stage != "w1a1":
            sp.core_reason = "stage 1w32a keeps float activations and softmax probabilities"
        elif sp.parts.get("attention") != "binarized":
            sp.core_reason = "attention part not binarized"
        elif site.mask != "none":
            sp.core_reason = f"mask kind {site.mask!r}: the binary attention core takes unmasked sites only"
        elif site.layout not in ("BHSD", "(BH)SD"):
            sp.core_reason = f"layout {site.layout}: fused packed projections"
        elif site.kv_heads is not None and site.heads is not None and site.kv_heads != site.heads:
            sp.core_reason = f"grouped keys/values ({site.kv_heads} of {site.heads} heads)"
        else:
            sp.core = True
        out.append(sp)
    return out


def _drop_attr(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase an unused ``get_attr`` node and delete the parameter it names from the module."""
    if node.users:
        return
    target = str(node.target)
    gm.graph.erase_node(node)
    owner_path, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if hasattr(owner, leaf):
        delattr(owner, leaf)


def _param(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    if node is None:
        return None
    owner_path, _, leaf = str(node.target).rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, leaf)


def install(gm: fx.GraphModule, plans: Sequence[SitePlan], stage: str, ratio: float,
            enabled_parts: Sequence[str] = PARTS) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """Replace the planned Linears and attention cores of ``gm`` in place by trainable BiViT modules.

    Returns ``{module name: (site name, role, module)}``; role ``"core"`` is the attention core. Modules of a part
    not in ``enabled_parts`` start disabled (float), for a staged schedule. Recompiles ``gm``.
    """
    graph = gm.graph
    installed: dict[str, tuple[str, str, torch.nn.Module]] = {}
    for sp in plans:
        for role, node in sp.linears.items():
            part = "attention" if role in ROLES["attention"] else "mlp"
            weight_node = node.args[1]
            bias_node = node.args[2] if len(node.args) > 2 else None
            module = BinaryLinear(_param(gm, weight_node), _param(gm, bias_node), binarize_input=stage == "w1a1",
                                  enabled=part in enabled_parts)
            name = f"bivit_{sp.site.name}_{role}"
            gm.add_submodule(name, module)
            with graph.inserting_before(node):
                new = graph.call_module(name, args=(node.args[0],))
            new.meta = dict(node.meta)
            new.meta["rw.rule"] = f"bivit:{sp.site.name}:{role}"
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            _drop_attr(gm, weight_node)
            if bias_node is not None:
                _drop_attr(gm, bias_node)
            installed[name] = (sp.site.name, role, module)
    cores = []
    for sp in plans:
        if sp.core:
            module = BinaryAttention(sp.site.scale, ratio, sp.site.k_transposed,
                                     enabled="attention" in enabled_parts)
            cores.append((sp.site, module))
            installed[f"softswap_{sp.site.name}"] = (sp.site.name, "core", module)
    if cores:
        emit_fx.splice(gm, cores)  # names the modules softswap_<site>; recompiles
    else:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return installed


def set_enabled(installed: dict[str, tuple[str, str, torch.nn.Module]], part: str, enabled: bool = True) -> None:
    """Switch the binarisation of one part on (or off); modules switched on re-initialise α from their weight."""
    for _, role, module in installed.values():
        in_part = (role in ROLES["attention"] or role == "core") if part == "attention" else role in ROLES["mlp"]
        if in_part and module.enabled != enabled:
            module.enabled = enabled
            if enabled and isinstance(module, BinaryLinear):
                module.reset_scale()


def freeze(gm: fx.GraphModule, installed: dict[str, tuple[str, str, torch.nn.Module]]) -> None:
    """Swap every installed trainable module of ``gm`` for its deploy form (in place)."""
    for name, (_, _, module) in installed.items():
        gm.add_submodule(name, module.freeze())
    gm.recompile()
