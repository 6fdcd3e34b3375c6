"""Linear attention with the elu+1 feature map, optional learned Hedgehog/Taylor maps and the
sliding-window hybrid of LoLCATs.

y_i = φ(q_i)ᵀ Σ_j M_ij φ(k_j) v_jᵀ / (φ(q_i)·Σ_j M_ij φ(k_j) + ε), ε = 1e-6 outside the dot product. No 1/√d
pre-scaling unless ``scale_qk`` (then q and k are each multiplied by √scale before φ). Key padding zeroes φ(k_j)
(numerator and denominator). An ``attn_mask`` (arbitrary) uses the exact O(N²) general-mask fallback; only its keep
part is used (an additive bias such as ALiBi is not expressible in linear attention).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from . import hybrid
from .base import AttentionVariant, VariantOption
from .featuremaps import feature_map_one, init_feature_params
from .linear_core import causal_apply, noncausal_normalized, reverse_apply
from .masks import compute_dtype, keep_mask, mask_checked

#: "boolean": arbitrary keep/drop masks (exact O(N²) fallback); additive biases are not expressible here.
MASK_KINDS = frozenset({"none", "causal", "key_padding", "boolean"})

OPTIONS = (
    VariantOption("eps", 1e-6, float, "denominator guard added outside φ(q)·z", minimum=0.0),
    VariantOption("feature_map", "elu", str, "elu (elu+1), hedgehog (learnable, LoLCATs softmax_dim) or taylor2",
                  choices=("elu", "hedgehog", "taylor2")),
    VariantOption("feature_dim", 0, int, "Hedgehog projection width F' (0 = head_dim); φ has 2F' features",
                  minimum=0),
    VariantOption("scale_qk", False, bool, "multiply q and k by √scale before φ (off in the official code)"),
    VariantOption("chunk_size", 64, int, "chunk length C of the causal chunked form", minimum=1),
    VariantOption("causal_form", "auto", str, "auto (= chunked, eager and exported), chunked (O(N) memory), prefix (O(N·F·E) memory), loop (eager only)",
                  choices=("auto", "chunked", "prefix", "loop")),
    VariantOption("window", 0, int, "sliding softmax window width w (0 = off; the LoLCATs hybrid)", minimum=0),
)


def feature_map_side(x, side, dtype, *, scale, params, feature_map, feature_dim, scale_qk):
    """φ_q(x) (``side="q"``) or φ_k(x) (``side="k"``) in ``dtype``, after the optional √scale pre-scaling."""
    xc = x.to(dtype)
    if scale_qk:
        xc = xc * math.sqrt(scale)
    return feature_map_one(xc, side=side, feature_map=feature_map, params=params, scale=scale,
                           feature_dim=feature_dim)


def feature_maps(q, k, *, scale, params, feature_map, feature_dim, scale_qk):
    """(φ(q), φ(k)) in the compute dtype, after the optional √scale pre-scaling."""
    cd = compute_dtype(q)
    kw = dict(scale=scale, params=params, feature_map=feature_map, feature_dim=feature_dim, scale_qk=scale_qk)
    return feature_map_side(q, "q", cd, **kw), feature_map_side(k, "k", cd, **kw)


def _noncausal(q, k, v, *, eps, key_padding, fmap) -> torch.Tensor:
    """Non-causal, no window, no arbitrary mask: (φ(q) KV) / (φ(q)·z + ε), KV = Σ φ(k_j) v_jᵀ, z = Σ φ(k_j)."""
    cd = compute_dtype(q)
    fq, fk = feature_maps(q, k, **fmap)
    if key_padding is not None:
        fk = fk * key_padding.to(cd)[:, None, :, None]
    return noncausal_normalized(fq, fk, v.to(cd), eps).to(q.dtype)


def _ones_col(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_padding: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
    eps: float = 1e-6,
    feature_map: str = "elu",
    feature_dim: int = 0,
    scale_qk: bool = False,
    chunk_size: int = 64,
    causal_form: str = "auto",
    window: int = 0,
) -> torch.Tensor:
    """Linear attention, (B,H,S,Dv) in q's dtype; states and normalisers in fp32 (fp64 for fp64 inputs)."""
    cd = compute_dtype(q)
    s_len, t_len = q.shape[-2], k.shape[-2]
    fmap = dict(scale=scale, params=params, feature_map=feature_map, feature_dim=feature_dim, scale_qk=scale_qk)
    if attn_mask is None and not causal and not hybrid.effective_window(window, s_len, t_len):
        return _noncausal(q, k, v, eps=eps, key_padding=key_padding, fmap=fmap)
    fq, fk = feature_maps(q, k, **fmap)
    vc = v.to(cd)
    if attn_mask is not None:
        if window:
            raise ValueError("linear attention: window hybrid does not support an arbitrary attn_mask")
        keep = keep_mask(s_len, t_len, causal=causal, key_padding=key_padding, attn_mask=attn_mask, device=q.device)
        a = (fq @ fk.transpose(-1, -2)) * keep.to(cd)
        return ((a @ vc) / (a.sum(-1, keepdim=True) + eps)).to(q.dtype)
    if key_padding is not None:
        fk = fk * key_padding.to(cd)[:, None, :, None]
    v1 = _ones_col(vc)
    w = hybrid.effective_window(window, s_len, t_len)
    if causal:
        r = causal_apply(fq, fk, v1, shift=w, chunk=chunk_size, form=causal_form)
    else:  # non-causal without a window returned above
        r = causal_apply(fq, fk, v1, shift=w, chunk=chunk_size, form=causal_form) + reverse_apply(
            fq, fk, v1, shift=w, chunk=chunk_size, form=causal_form)
    win = gamma = None
    if w:
        win = hybrid.window_softmax_terms(q.to(cd), k.to(cd), vc, scale=scale, window=w, causal=causal,
                                          key_padding=key_padding)
        gamma = hybrid.window_gamma(params, q.shape[1], cd, q.device)
    return readout(r[..., :-1], r[..., -1:], eps=eps, window_terms=win, gamma=gamma).to(q.dtype)


def readout(num: torch.Tensor, den: torch.Tensor, *, eps: float,
            window_terms: tuple[torch.Tensor, torch.Tensor] | None = None, gamma: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Linear attention's output from the rest operator's numerator φ(q)ᵀΣφ(k)vᵀ (…,E) and mass φ(q)·Σφ(k)
    (…,1): num / (den + ε); with the hybrid window's softmax terms (:func:`hybrid.softmax_terms`) and gate γ, the
    two mixed by :func:`hybrid.mix`. Shared by the eager/exported forms and the decode step."""
    out = num / (den + eps)
    if window_terms is None:
        return out
    return hybrid.mix(*window_terms, num, den, out, gamma)


def init_params(heads: int, head_dim: int, options: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Hedgehog maps (``fmap_q``, ``fmap_k``: (H, D, F'), identity-like) and the window gate (``window_gate``: (H,),
    −2.197) as enabled by the options; empty for the plain elu form."""
    out = init_feature_params(heads, head_dim, options.get("feature_map", "elu"), options.get("feature_dim", 0))
    if options.get("window", 0):
        out.update(hybrid.init_window_params(heads))
    return out


LINEAR = AttentionVariant(
    name="linear",
    fn=mask_checked("linear", MASK_KINDS, linear_attention),
    mask_kinds=MASK_KINDS,
    options=OPTIONS,
    init_params=init_params,
    description="linear attention, φ = elu+1 (Katharopoulos et al.); O(N) for none/causal/key_padding, "
    "arbitrary masks via the exact O(N²) fallback",
    extra={"arbitrary_cost": "O(N^2) fallback", "learnable": ("fmap_q", "fmap_k", "window_gate")},
)
