"""Normalize a torch.export program before TVM's torch frontend.

TVM's SDPA converter ignores ``scale`` and ``enable_gqa``, accepts float masks only and asserts ``dropout_p == 0``.
:func:`normalize_exported_program` replaces every ``aten.scaled_dot_product_attention`` call by explicit math (the
engine's softmax attention, :func:`rewrite.attention_math.softmax_attention`, with SDPA's conventions: GQA heads
repeated with ``repeat_interleave``, ``is_causal`` upper-left aligned, fully masked rows 0 as torch's safe softmax,
dropout dropped), removes ``aten.dropout`` nodes and spells ``aten.amax`` (which the frontend lacks; BiViT's
softmax-aware binarisation reads the row maximum with it) as ``aten.max.dim`` reductions, then re-exports the
module with static example inputs taken from the program's input metadata.  The input program is not modified.
"""

from __future__ import annotations

import logging
import math

import torch

from rewrite.attention_math import softmax_attention

log = logging.getLogger(__name__)

_SDPA = {torch.ops.aten.scaled_dot_product_attention.default}
_DROPOUT = {torch.ops.aten.dropout.default}
_AMAX = {torch.ops.aten.amax.default}


def amax_as_max(x, dim=(), keepdim=False):
    """``torch.amax`` as one ``torch.max(x, d, keepdim)`` per reduced axis (all axes for an empty ``dim``)."""
    axes = sorted({int(d) % x.dim() for d in dim} if len(dim) else range(x.dim()), reverse=True)
    for d in axes:
        x = torch.max(x, d, keepdim).values
    return x


def sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Reference SDPA as explicit matmul / softmax / matmul (inference: dropout ignored).

    Shapes: query (..., Hq, S, E), key (..., Hk, L, E), value (..., Hk, L, Ev); returns (..., Hq, S, Ev).
    """
    s = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    if query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    return softmax_attention(query, key, value, scale=s, causal=bool(is_causal), attn_mask=attn_mask,
                             causal_align="top_left")


def _example_inputs(ep: torch.export.ExportedProgram, shapes: dict | None = None) -> tuple:
    """One tensor per user input, in order: of the shape given in ``shapes`` (by input name), else the program's
    shape with symbolic dims specialized to their hint."""
    user = set(ep.graph_signature.user_inputs)
    args = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            shape = [int(d) for d in (shapes or {}).get(node.name, val.shape)]
            if val.dtype.is_floating_point:
                args.append(torch.randn(shape, dtype=val.dtype))
            elif val.dtype == torch.bool:
                args.append(torch.ones(shape, dtype=torch.bool))
            else:
                args.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(args)


def normalize_exported_program(ep: torch.export.ExportedProgram,
                               shapes: dict | None = None) -> torch.export.ExportedProgram:
    """Return an ExportedProgram without SDPA / dropout / amax nodes (see module docstring); unchanged if none and no
    ``shapes`` ({input name: dims}) are given — with shapes, the program is re-exported specialized to them."""
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    if not targets & (_SDPA | _DROPOUT | _AMAX) and not shapes:
        return ep
    gm = ep.module()
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _SDPA:
            node.target = sdpa_math
            count += 1
        elif node.target in _AMAX:
            node.target = amax_as_max
            count += 1
        elif node.target in _DROPOUT:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    gm.graph.lint()
    gm.recompile()
    log.info("torch normalize: %d SDPA/dropout/amax node(s) rewritten", count)
    # the program's own calling convention: a Hugging Face model exported with keyword inputs must be re-exported
    # with the same keywords (positional tensors fail the unlifted module's input check)
    args, kwargs = torch.utils._pytree.tree_unflatten(list(_example_inputs(ep, shapes)), ep.call_spec.in_spec)
    return torch.export.export(gm, tuple(args), kwargs=dict(kwargs))
