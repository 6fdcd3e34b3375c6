"""The attention-weight cross-entropy term of LoLCATs stage 1 (λ_ce), and the query-row mask of the output MSE.

For a site with canonical q, k (B, H, N, D), scale s and key padding (B, T) (True = keep), the teacher's attention
map is A = softmax(s·q kᵀ) over the kept keys, and the student's map Â is read off the replacement itself: every
replacement in the catalogue is linear in v (output = Â v), so calling the variant with v = I (one-hot value per
key, (B, H, T, T)) returns Â exactly, whatever its feature map, window hybrid or normalisation. The term is

    CE = −(1/|rows|) Σ_rows Σ_j A_ij · log(max(Â_ij, 1e-12))

averaged over query rows that are real tokens (rows of padded queries are left out; for a site without key padding
every row counts). Maps with negative weights (MALA) are clamped at 1e-12 inside the log, so the term only pulls
probability mass towards the teacher's keys. Cost: one extra (T × T) map per head — sized for encoder sites
(T ≤ a few hundred), which is what transfer calibrates on.

Contract: :func:`attention_ce` and :func:`row_weights` take a :class:`rewrite.binding.SiteModule` and one captured
sample ``[q, k, v, *mask_values, original_output]``; both are differentiable in the module's parameters.
"""
from __future__ import annotations

import torch

from rewrite.binding import SiteModule

#: Floor of the student's weights inside the logarithm.
LOG_FLOOR = 1e-12


def row_weights(module: SiteModule, sample: list[torch.Tensor]) -> torch.Tensor | None:
    """(B, 1, N, 1) float weights of the query rows of a self-attention site with key padding (1 = real token,
    0 = padding), or None when the site has no key padding or queries and keys differ in length."""
    q, k, _, kwargs = module.canonical(*sample[:-1])
    keep = kwargs.get("key_padding")
    if keep is None or q.shape[-2] != k.shape[-2]:
        return None
    return keep[:, None, :, None].float()


def ce_normaliser(module: SiteModule, sample: list[torch.Tensor]) -> float:
    """What :func:`attention_ce` divides by on ``sample``: its real query rows (all B·H·N rows without key padding)."""
    b, h, n = module.canonical(*sample[:-1])[0].shape[:3]
    rows = row_weights(module, sample)
    return float(b * h * n) if rows is None else max(float(rows.sum()) * h, 1.0)


def attention_ce(module: SiteModule, sample: list[torch.Tensor], normaliser: float | None = None) -> torch.Tensor:
    """Cross-entropy of the student's attention map against the softmax map, averaged over real query rows.
    ``normaliser``: divide the sum by this instead (a slice of a sample, normalised by the whole sample's
    :func:`ce_normaliser`: intra-site data parallelism)."""
    q, k, _, kwargs = module.canonical(*sample[:-1])
    t = k.shape[-2]
    eye = torch.eye(t, dtype=q.dtype, device=q.device).expand(q.shape[0], q.shape[1], t, t)
    params = dict(module.params) if len(module.params) else None
    student = module.variant.fn(q, k, eye, params=params, **kwargs, **module.options).float()
    logits = (q.float() @ k.float().transpose(-1, -2)) * kwargs["scale"]
    keep = kwargs.get("key_padding")
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
    if kwargs.get("causal"):
        n = q.shape[-2]
        tri = torch.ones(n, t, dtype=torch.bool, device=q.device).tril(t - n)
        logits = logits.masked_fill(~tri, float("-inf"))
    teacher = torch.softmax(logits, -1)
    ce = -(teacher * torch.log(student.clamp_min(LOG_FLOOR))).sum(-1)  # (B, H, N)
    rows = row_weights(module, sample)
    if rows is None:
        return ce.mean() if normaliser is None else ce.sum() / normaliser
    w = rows[..., 0].expand_as(ce)
    return (ce * w).sum() / (w.sum().clamp_min(1.0) if normaliser is None else normaliser)
