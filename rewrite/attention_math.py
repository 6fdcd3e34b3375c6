"""Softmax attention, written once: the canonical form every replacement is compared with, and the explicit
form the lowering substitutes for fused attention ops.

``y_i = Σ_j M_ij exp(s q_i·k_j + b_ij) v_j / Σ_j M_ij exp(s q_i·k_j + b_ij)``, computed in fp32 (fp64 for fp64
inputs). Conventions:

- a *keep* mask is a bool tensor broadcastable to (B, H, S, T), True = the query may see the key;
- ``causal`` is bottom-right aligned by default (query i sees key j iff j <= i + (T - S), the KV-cache reading);
  ``causal_align="top_left"`` gives j <= i, the reading of SDPA's ``is_causal`` and ONNX ``Attention``. The two
  agree when S == T;
- an additive float mask drops the entries at or below :data:`DROP_THRESHOLD` (``-inf`` included) and adds the
  others as a bias (ALiBi, relative positions);
- fully masked rows give 0, never NaN and never a uniform average (as ``torch``'s safe softmax).

The form stays recognizable as softmax attention (a ``softmax`` op between two matmuls), so a model rewritten with
it re-inspects to the same sites: ``where(keep, s·q·kᵀ + bias, min)`` → ``softmax`` → ``× keep`` → ``· v``.
All helpers are traceable by ``torch.export`` with dynamic lengths (masks from ``arange`` comparisons, no Python
control flow on tensor values).
"""
from __future__ import annotations

import torch

#: Additive-mask entries at or below this value are treated as "drop". Any value this low already gives
#: exp(x) == 0 in fp32, so rows with at least one kept entry are unchanged; only fully masked rows differ.
DROP_THRESHOLD = -1.0e4


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype for states, sums and normalisers: fp64 for fp64 inputs, fp32 otherwise (fp16/bf16/fp32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def causal_keep(s_len, t_len, device: torch.device, shift: int = 0, align: str = "bottom_right") -> torch.Tensor:
    """(S, T) bool: key j visible from query i iff j <= i + (T - S) - shift (bottom-right aligned causal), or
    j <= i - shift with ``align="top_left"``."""
    i = torch.arange(s_len, device=device).unsqueeze(-1)
    j = torch.arange(t_len, device=device).unsqueeze(0)
    if align == "top_left":
        return j <= i - shift
    if align != "bottom_right":
        raise ValueError(f"causal alignment {align!r}: expected 'bottom_right' or 'top_left'")
    return j <= i + (t_len - s_len) - shift


def split_attn_mask(attn_mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split an attention mask into (keep bool, additive bias in ``dtype`` or None).

    A bool mask means True = keep and carries no bias. A float mask is additive: entries <= :data:`DROP_THRESHOLD`
    (including -inf) are dropped; the remaining entries are a bias added to the logits (e.g. ALiBi), with dropped
    entries' bias set to 0 so that no -inf/finfo.min value reaches later arithmetic.
    """
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    m = attn_mask.to(dtype)
    keep = m > DROP_THRESHOLD
    bias = torch.where(keep, m, torch.zeros((), dtype=dtype, device=m.device))
    return keep, bias


def keep_mask(s_len, t_len, *, causal: bool, key_padding: torch.Tensor | None, attn_mask: torch.Tensor | None,
              device: torch.device, causal_align: str = "bottom_right") -> torch.Tensor | None:
    """The combined keep mask (bool, broadcastable to (B, H, S, T)) or None when nothing is masked.

    ``key_padding`` is (B, T) bool, True = real token. A float ``attn_mask`` contributes its keep part only
    (see :func:`split_attn_mask` for the bias).
    """
    keep: torch.Tensor | None = None
    if causal:
        keep = causal_keep(s_len, t_len, device, align=causal_align)
    if key_padding is not None:
        kp = key_padding.to(torch.bool)[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if attn_mask is not None:
        am = split_attn_mask(attn_mask, torch.float32)[0]
        keep = am if keep is None else keep & am
    return keep


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                      key_padding: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                      causal_align: str = "bottom_right") -> torch.Tensor:
    """Exact softmax attention on (B, H, S, D) q, (B, H, T, D) k, (B, H, T, Dv) v; returns (B, H, S, Dv) in q's
    dtype. Every mask kind; fully masked rows give 0 (module doc)."""
    cd = compute_dtype(q)
    s_len, t_len = q.shape[-2], k.shape[-2]
    logits = (q.to(cd) @ k.to(cd).transpose(-1, -2)) * scale
    low = torch.finfo(cd).min
    guards: list[torch.Tensor] = []
    keep: torch.Tensor | None = None
    if causal:
        keep = causal_keep(s_len, t_len, q.device, align=causal_align)
    if key_padding is not None:
        kp = key_padding.to(torch.bool)[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask if keep is None else keep & attn_mask
    elif attn_mask is not None:  # additive: dropped entries are pushed to finfo.min by the mask itself
        m = attn_mask.to(cd).clamp(min=low)
        logits = logits + m
        guards.append(m > DROP_THRESHOLD)
    if keep is not None:
        logits = torch.where(keep, logits, torch.full((), low, dtype=cd, device=q.device))
        guards.insert(0, keep)
    p = torch.softmax(logits, dim=-1)
    for guard in guards:  # 0 on fully masked rows; elsewhere the dropped entries are already exp(-huge) == 0
        p = p * guard.to(cd)
    return (p @ v.to(cd)).to(q.dtype)
