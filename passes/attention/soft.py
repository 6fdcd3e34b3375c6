"""SOFT — softmax-free attention with a Gaussian kernel, Nyström landmarks and a Newton–Schulz inverse
(Lu et al., NeurIPS 2021 / IJCV 2024). Encoder-only: no causal, padded or arbitrary masks
(landmarks pool over every token).

Untied generalisation for pretrained models (project design): κ(a, b) = exp(−(s/2)‖a − b‖²) with the host scale s
(= exp(−‖a − b‖²/(2√d)) for s = d^{-1/2}; squared distances clamped ≥ 0), landmarks Q̃, K̃ = means of m contiguous
segments of Q and K, K1 = κ(Q, K̃), K2 = κ(Q̃, K̃), K3 = κ(Q̃, K), Y = K1 · X · (K3 V) with X ≈ (K2 + ridge·I)^{-1}
by Newton–Schulz: α = 1.8/(‖P‖₁‖P‖∞) (= 0.9·2/r_max² for symmetric P), X₀ = αPᵀ, X ← 2X − XPX, ``iterations``
times (20 = official). ``newton_tol`` > 0 freezes X once ‖I − PX‖_F/√m <= tol (fixed iteration count, traceable).
``normalize`` divides by Y computed with V = 1. The inverse runs in fp32 (fp64 for fp64 inputs); no
torch.linalg.inv/pinv (not exportable).
"""
from __future__ import annotations

import math

import torch

from .base import AttentionVariant, VariantOption
from .masks import check_mask, compute_dtype, mask_checked

MASK_KINDS = frozenset({"none"})

OPTIONS = (
    VariantOption("num_landmarks", 64, int, "m, number of landmarks (segment means; repeated tokens when N < m)",
                  minimum=1),
    VariantOption("iterations", 20, int, "Newton–Schulz iterations T (20 official; ~2·log2(r_max/0.01)+5 to converge)",
                  minimum=0),
    VariantOption("ridge", 0.01, float, "ridge added to K2's diagonal before inversion", minimum=0.0),
    VariantOption("newton_tol", 0.0, float, "freeze X once ‖I − PX‖_F/√m <= tol (0 = off)", minimum=0.0),
    VariantOption("normalize", False, bool, "row-normalise by the output for V = 1 (project option)"),
)


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """κ(a_i, b_j) = exp(−(scale/2)·max(‖a_i‖² + ‖b_j‖² − 2a_i·b_j, 0)). (…, N, D), (…, M, D) → (…, N, M)."""
    sq = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1).unsqueeze(-2) - 2.0 * (a @ b.transpose(-1, -2))
    return torch.exp(-0.5 * scale * sq.clamp_min(0.0))


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """m landmarks of x (…, N, D): landmark l = mean of tokens [⌊lN/m⌋, max(⌊(l+1)N/m⌋, ⌊lN/m⌋ + 1)).

    Every segment holds at least one token (when N < m tokens repeat); with N = m landmarks equal tokens.
    """
    n = x.shape[-2]
    ell = torch.arange(m, device=x.device)
    start = torch.div(ell * n, m, rounding_mode="floor")
    end = torch.maximum(torch.div((ell + 1) * n, m, rounding_mode="floor"), start + 1)
    j = torch.arange(n, device=x.device).unsqueeze(0)
    member = ((j >= start.unsqueeze(-1)) & (j < end.unsqueeze(-1))).to(x.dtype)  # (m, N)
    member = member / member.sum(-1, keepdim=True)
    return member @ x


def newton_schulz_inverse(
    p: torch.Tensor, iterations: int, tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X ≈ P^{-1} (…, m, m), final residual ‖I − PX‖_F (…)) by Newton–Schulz; see module docstring."""
    m = p.shape[-1]
    eye = torch.eye(m, dtype=p.dtype, device=p.device)
    norm_inf = p.abs().sum(-1).amax(-1)
    norm_one = p.abs().sum(-2).amax(-1)
    alpha = (1.8 / (norm_inf * norm_one))[..., None, None]
    x = alpha * p.transpose(-1, -2)
    for _ in range(iterations):
        xn = 2.0 * x - x @ p @ x
        if tol > 0:
            res = torch.linalg.matrix_norm(eye - p @ x) / math.sqrt(m)
            x = torch.where((res <= tol)[..., None, None], x, xn)
        else:
            x = xn
    residual = torch.sqrt(((eye - p @ x) ** 2).sum((-1, -2)))
    return x, residual


def soft_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    key_padding: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
    num_landmarks: int = 64,
    iterations: int = 20,
    ridge: float = 0.01,
    newton_tol: float = 0.0,
    normalize: bool = False,
) -> torch.Tensor:
    """SOFT attention, (B,H,S,Dv) in q's dtype. Raises ValueError for any mask (encoder-only, unmasked)."""
    check_mask("soft", MASK_KINDS, causal=causal, key_padding=key_padding, attn_mask=attn_mask)
    cd = compute_dtype(q)
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    lq = segment_means(qc, num_landmarks)
    lk = segment_means(kc, num_landmarks)
    k1 = gaussian_kernel(qc, lk, scale)
    k2 = gaussian_kernel(lq, lk, scale)
    k3 = gaussian_kernel(lq, kc, scale)
    eye = torch.eye(num_landmarks, dtype=cd, device=q.device)
    x, _ = newton_schulz_inverse(k2 + ridge * eye, iterations, newton_tol)
    left = k1 @ x
    y = left @ (k3 @ vc)
    if normalize:
        den = left @ k3.sum(-1, keepdim=True)
        tiny = torch.finfo(cd).tiny
        y = y / torch.where(den.abs() > tiny, den, torch.ones_like(den))
    return y.to(q.dtype)


SOFT = AttentionVariant(
    name="soft",
    fn=mask_checked("soft", MASK_KINDS, soft_attention),
    mask_kinds=MASK_KINDS,
    options=OPTIONS,
    init_params=lambda heads, head_dim, options: {},
    description="SOFT: Gaussian-kernel Nyström attention with Newton–Schulz inverse (Lu et al.); encoder-only",
    extra={"encoder_only": True},
)
