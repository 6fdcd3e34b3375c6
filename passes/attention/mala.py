"""MALA — magnitude-aware linear attention, with the project's causal/padded extension.

Official non-causal operator (no RoPE split: q and k arrive after the host's RoPE, so φ̃ = φ here):
a_ij = (s/N) φ(q_i)·φ(k_j), z_i = Σ_j a_ij, KV = (s/N) Σ_j φ(k_j) v_jᵀ, v̄ = (1/N) Σ_j v_j,
y_i = φ(q_i)ᵀ KV (1 + 1/(z_i + ε)) − z_i v̄, ε = 1e-6.

Extension (project design, not in the paper or official code; flagged in ``extra``): N → n_i = Σ_j M_ij and all
sums restricted to visible keys (causal prefix / key padding / arbitrary keep mask, the latter via an O(N²) form).
Rows with n_i = 0 give 0. The sliding-window hybrid (``window``) mixes a softmax window with MALA over the rest
keys, the rest weighted by its linear mass φ(q_i)·Σ_rest φ(k_j) (project design, see :mod:`.hybrid`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from . import hybrid
from .base import AttentionVariant, VariantOption
from .featuremaps import init_feature_params
from .linear import feature_maps
from .linear_core import causal_apply, colsum, noncausal_state, reverse_apply
from .masks import compute_dtype, keep_mask, mask_checked

#: "boolean": arbitrary keep/drop masks (exact O(N²) fallback); additive biases are not expressible here.
MASK_KINDS = frozenset({"none", "causal", "key_padding", "boolean"})

OPTIONS = (
    VariantOption("eps", 1e-6, float, "guard in 1/(z_i + ε)", minimum=0.0),
    VariantOption("feature_map", "elu", str, "elu (official), hedgehog (learnable) or taylor2",
                  choices=("elu", "hedgehog", "taylor2")),
    VariantOption("feature_dim", 0, int, "Hedgehog projection width F' (0 = head_dim)", minimum=0),
    VariantOption("scale_qk", False, bool, "multiply q and k by √scale before φ (off in the official code)"),
    VariantOption("chunk_size", 64, int, "chunk length C of the causal chunked form", minimum=1),
    VariantOption("causal_form", "auto", str, "auto (= chunked, eager and exported), chunked (O(N) memory), prefix (O(N·F·E) memory), loop (eager only)",
                  choices=("auto", "chunked", "prefix", "loop")),
    VariantOption("window", 0, int, "sliding softmax window width w (0 = off; hybrid, project design)", minimum=0),
)


def mala_readout(num_raw, z_raw, sum_v, n, *, scale: float, eps: float) -> torch.Tensor:
    """y = (s/n) num_raw (1 + 1/(z + ε)) − z v̄ with z = (s/n) z_raw, v̄ = sum_v / n; n clamped to >= 1."""
    n = n.clamp_min(1.0)
    z = (scale / n) * z_raw
    return (scale / n) * num_raw * (1.0 + 1.0 / (z + eps)) - z * (sum_v / n)


def _noncausal(q, k, v, *, scale, eps, key_padding, fmap) -> torch.Tensor:
    """Non-causal, no window, no arbitrary mask: num_raw = φ(q) KV, z_raw = φ(q)·z against the small state, and the
    visible-key sums Σ m_j v_j, n = Σ m_j as (B,·,1,·) rows broadcast over the queries (no ones columns)."""
    cd = compute_dtype(q)
    t_len = k.shape[-2]
    kw = None if key_padding is None else key_padding.to(cd)

    def readout(fq, state):
        kv, z, sum_v, n = state
        return mala_readout(fq @ kv, fq @ z, sum_v, n, scale=scale, eps=eps)

    fq, fk = feature_maps(q, k, **fmap)
    vc = v.to(cd)
    if kw is None:
        sum_v = colsum(vc)
        n = torch.ones_like(vc[..., :1, :1]) * t_len
    else:
        sum_v = kw[:, None, None, :] @ vc  # (B,1,1,T) @ (B,H,T,E): Σ_j m_j v_j
        n = kw.sum(-1)[:, None, None, None]
        fk = fk * kw[:, None, :, None]
    return readout(fq, noncausal_state(fk, vc) + (sum_v, n)).to(q.dtype)


def mala_attention(
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
    """MALA, (B,H,S,Dv) in q's dtype; sums, z and 1/(z+ε) in fp32 (fp64 for fp64 inputs)."""
    cd = compute_dtype(q)
    s_len, t_len = q.shape[-2], k.shape[-2]
    fmap = dict(scale=scale, params=params, feature_map=feature_map, feature_dim=feature_dim, scale_qk=scale_qk)
    if attn_mask is None and not causal and not hybrid.effective_window(window, s_len, t_len):
        return _noncausal(q, k, v, scale=scale, eps=eps, key_padding=key_padding, fmap=fmap)
    fq, fk = feature_maps(q, k, **fmap)
    vc = v.to(cd)
    if attn_mask is not None:
        if window:
            raise ValueError("MALA: window hybrid does not support an arbitrary attn_mask")
        keep = keep_mask(s_len, t_len, causal=causal, key_padding=key_padding, attn_mask=attn_mask,
                         device=q.device).to(cd)
        a = (fq @ fk.transpose(-1, -2)) * keep
        n = keep.sum(-1, keepdim=True)
        y = mala_readout(a @ vc, a.sum(-1, keepdim=True), keep @ vc, n, scale=scale, eps=eps)
        return y.to(q.dtype)
    h = q.shape[1]
    ones_q = torch.ones_like(fq[..., :1])
    mk = torch.ones_like(fk[..., :1])
    if key_padding is not None:
        mk = mk * key_padding.to(cd)[:, None, :, None]
        fk = fk * mk
    v1 = torch.cat([vc, torch.ones_like(vc[..., :1])], dim=-1)
    w = hybrid.effective_window(window, s_len, t_len)

    def core(a_, b_):
        if causal:
            return causal_apply(a_, b_, v1, shift=w, chunk=chunk_size, form=causal_form)
        # non-causal without a window returned above
        return causal_apply(a_, b_, v1, shift=w, chunk=chunk_size, form=causal_form) + reverse_apply(
            a_, b_, v1, shift=w, chunk=chunk_size, form=causal_form)

    r = core(fq, fk)
    c = core(ones_q, mk)
    num_raw, z_raw = r[..., :-1], r[..., -1:]
    sum_v, n = c[..., :-1], c[..., -1:]
    win = gamma = None
    if w:
        win = hybrid.window_softmax_terms(q.to(cd), k.to(cd), vc, scale=scale, window=w, causal=causal,
                                          key_padding=key_padding)
        gamma = hybrid.window_gamma(params, h, cd, q.device)
    return hybrid_readout(num_raw, z_raw, sum_v, n, scale=scale, eps=eps, window_terms=win, gamma=gamma
                          ).to(q.dtype)


def hybrid_readout(num_raw, z_raw, sum_v, n, *, scale: float, eps: float,
                   window_terms: tuple[torch.Tensor, torch.Tensor] | None = None,
                   gamma: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`mala_readout` over the rest keys; with the hybrid window's softmax terms and gate γ, mixed by
    :func:`hybrid.mix` with the rest weighted by its raw linear mass z_raw = φ(q)·Σ_rest φ(k). Shared by the
    eager/exported forms and the decode step."""
    y = mala_readout(num_raw, z_raw, sum_v, n, scale=scale, eps=eps)
    if window_terms is None:
        return y
    return hybrid.mix(*window_terms, z_raw * y, z_raw, y, gamma)


def init_params(heads: int, head_dim: int, options: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Hedgehog maps (``fmap_q``, ``fmap_k``) and the window gate (``window_gate``) as enabled by the options."""
    out = init_feature_params(heads, head_dim, options.get("feature_map", "elu"), options.get("feature_dim", 0))
    if options.get("window", 0):
        out.update(hybrid.init_window_params(heads))
    return out


MALA = AttentionVariant(
    name="mala",
    fn=mask_checked("mala", MASK_KINDS, mala_attention),
    mask_kinds=MASK_KINDS,
    options=OPTIONS,
    init_params=init_params,
    description="magnitude-aware linear attention (Fan et al. 2025); causal/padded/arbitrary forms are a project "
    "extension (n_i = visible keys)",
    extra={
        "extension_mask_kinds": ("causal", "key_padding", "arbitrary"),
        "arbitrary_cost": "O(N^2) fallback",
        "rope_split": "not applied: q/k arrive after RoPE, so z uses the rotated φ",
        "learnable": ("fmap_q", "fmap_k", "window_gate"),
    },
)
