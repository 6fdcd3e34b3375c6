"""Bind a recognized site to a variant: the one torch module that computes a site's replacement.

:class:`SiteModule` takes the site's graph values in their original layout (q, k or Kᵀ, v, then the mask terms),
puts them in the canonical form of ``rewrite/variant.py`` (B, H, S, D; GQA expanded; masks turned into
``causal`` / ``key_padding`` / an additive ``attn_mask``), calls the variant, and returns the result in the
original layout and dtype. The FX emitter inserts it as a submodule and re-exports (so the program stays ATen and
trainable); the ONNX emitter exports the same module with the torch ONNX exporter and splices the graph in. The
math therefore exists once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .recognize import NEG_FILL
from .sites import AttentionSite
from .variant import AttentionVariant

#: Additive masks at or below this value (after summing terms) mark a key as dropped when deriving key padding;
#: the recognizer uses the same threshold for fill values.
PADDING_THRESHOLD = NEG_FILL


@dataclass(frozen=True)
class SiteSpec:
    """What :class:`SiteModule` needs to know about a site, free of graph handles (so it can be pickled)."""

    scale: float
    causal: bool
    mask: str
    layout: str
    heads: int | None
    k_transposed: bool
    term_modes: tuple[str, ...] = ()
    gqa: bool = False
    out_dtype: str | None = None
    same_length: bool = False

    @classmethod
    def from_site(cls, site: AttentionSite, out_dtype: str | None, same_length: bool = False) -> "SiteSpec":
        """``same_length``: the graph proves queries and keys have one length (self-attention without cache)."""
        return cls(scale=site.scale, causal=site.causal, mask=site.mask, layout=site.layout, heads=site.heads,
                   k_transposed=site.k_transposed, term_modes=tuple(t.mode for t in site.mask_terms),
                   gqa=site.kv_heads is not None and site.heads is not None and site.kv_heads != site.heads,
                   out_dtype=out_dtype, same_length=same_length)


def needed_mask_kinds(mask: str) -> set[str]:
    """The variant mask kinds (:mod:`rewrite.variant`) a site's mask kind needs."""
    return {"none": set(), "causal": {"causal"}, "key_padding": {"key_padding"},
            "causal+padding": {"causal", "key_padding"}, "additive": {"arbitrary"},
            "boolean": {"boolean"}}[mask]


def supports(variant_kinds: set[str] | frozenset[str], mask: str) -> bool:
    """Whether a variant declaring ``variant_kinds`` can take a site whose mask kind is ``mask``."""
    kinds = set(variant_kinds)
    if "arbitrary" in kinds:
        kinds.add("boolean")
    return needed_mask_kinds(mask) <= kinds


def combine_mask_terms(modes: tuple[str, ...], values: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Sum the site's mask terms into one additive float mask (0 keep, finfo.min drop) in ``dtype``."""
    total = None
    neg = torch.finfo(dtype).min
    for mode, value in zip(modes, values):
        if mode == "add":
            term = value.to(dtype)
        elif mode == "keep":
            term = torch.where(value.bool(), torch.zeros((), dtype=dtype), torch.full((), neg, dtype=dtype))
        else:
            term = torch.where(value.bool(), torch.full((), neg, dtype=dtype), torch.zeros((), dtype=dtype))
        total = term if total is None else torch.clamp(total + term, min=neg)
    return total


class SiteModule(nn.Module):
    """Computes one site's replacement with ``variant``; parameters (if any) are trainable ``nn.Parameter``s."""

    def __init__(self, variant: AttentionVariant, spec: SiteSpec, options: Mapping[str, Any],
                 params: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.variant = variant
        self.spec = spec
        self.options = dict(options)
        self.params = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in (params or {}).items()})

    def canonical(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *mask_values: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The canonical (q, k, v, keyword arguments) of the variant call, from the site's values."""
        spec = self.spec
        if spec.k_transposed:
            k = k.transpose(-2, -1)
        if spec.same_length:  # tell the tracer S == T, so variants take their self-attention forms
            torch._check(k.shape[-2] == q.shape[-2])
        three_d = q.dim() == 3
        if three_d:
            heads = spec.heads or 1
            q = q.reshape(-1, heads, q.shape[-2], q.shape[-1])
            k = k.reshape(-1, heads, k.shape[-2], k.shape[-1])
            v = v.reshape(-1, heads, v.shape[-2], v.shape[-1])
        if k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        kwargs: dict[str, Any] = {"scale": spec.scale, "causal": False, "key_padding": None}
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        mask = combine_mask_terms(spec.term_modes, mask_values, compute)
        if mask is not None:
            if three_d:
                mask = mask.reshape(-1, spec.heads or 1, mask.shape[-2], mask.shape[-1]) if mask.dim() == 3 else mask
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
            mask = mask.expand(q.shape[0], mask.shape[1], mask.shape[2], k.shape[2])
        supported = self.variant.mask_kinds
        takes_mask = "arbitrary" in supported or ("boolean" in supported and spec.mask == "boolean")
        if takes_mask and mask is not None:
            kwargs["attn_mask"] = mask
            kwargs["causal"] = spec.causal
        else:
            kwargs["causal"] = spec.causal or spec.mask in ("causal", "causal+padding")
            if spec.mask in ("key_padding", "causal+padding") and mask is not None:
                kwargs["key_padding"] = mask[:, 0, -1, :] > PADDING_THRESHOLD
        return q, k, v, kwargs

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *mask_values: torch.Tensor) -> torch.Tensor:
        three_d = q.dim() == 3
        in_dtype = q.dtype
        q, k, v, kwargs = self.canonical(q, k, v, *mask_values)
        params = dict(self.params) if len(self.params) else None
        out = self.variant.fn(q, k, v, params=params, **kwargs, **self.options)
        if three_d:
            out = out.reshape(-1, out.shape[-2], out.shape[-1])
        out_dtype = getattr(torch, self.spec.out_dtype) if self.spec.out_dtype else in_dtype
        return out.to(out_dtype)


def site_module(variant: AttentionVariant, site: AttentionSite, g: Any, options: Mapping[str, Any],
                params: Mapping[str, torch.Tensor] | None = None) -> SiteModule:
    """The module computing ``site``'s replacement with ``variant`` in graph ``g``: its spec read from the site
    (``same_length`` when the graph proves queries and keys have one length) and its parameters (``params``, else
    the variant's initial ones)."""
    q_shape, k_shape = g.shape(site.q), g.shape(site.k)
    k_axis = -1 if site.k_transposed else -2
    same = bool(q_shape and k_shape and q_shape[-2] is not None and q_shape[-2] == k_shape[k_axis])
    spec = SiteSpec.from_site(site, g.dtype(site.output), same_length=same)
    if params is None and variant.init_params is not None and site.heads and site.head_dim:
        params = variant.init_params(site.heads, site.head_dim, options)
    return SiteModule(variant, spec, options, params)
