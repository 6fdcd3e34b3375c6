"""Sliding-window hybrid: exact softmax inside a window of width w, a linear-family operator outside
(LoLCATs, Eq. 7).

Window of query i (p_i = i + T - S, bottom-right aligned): causal p_i - w < j <= p_i; non-causal |j - p_i| < w.
With window terms e_ij = exp(s q_i·k_j - c_i), c_i = max of the visible window logits (subtracted from the softmax
terms only, as in the reference; not "fixed"):

    y_i = (γ Σ_win e_ij v_j + R_i) / (γ Σ_win e_ij + Z_i)

where (R_i, Z_i) are the rest operator's numerator and mass (linear: φ(q_i)ᵀ Σ_rest φ(k_j) v_jᵀ and
φ(q_i)·Σ_rest φ(k_j)). γ = σ(g_h) per head, g initialised to −2.197 (γ = 0.1). When a query's window is empty the
rest operator's own output is returned, so w = 0 is exactly the pure linear operator and w >= max(S, T) is exactly
softmax attention (γ cancels).

Memory of the window part: O(S · R · D) with R = w (causal) or 2w - 1 (non-causal) gathered keys.
"""
from __future__ import annotations

import math

import torch

GATE_INIT = -2.197  # σ(−2.197) ≈ 0.1 (LoLCATs)


def init_window_params(heads: int) -> dict[str, torch.Tensor]:
    """Per-head window gate logits g (H,), γ = σ(g) = 0.1 at init."""
    return {"window_gate": torch.full((heads,), GATE_INIT, dtype=torch.float32)}


def window_gamma(params: dict[str, torch.Tensor] | None, heads: int, dtype: torch.dtype, device) -> torch.Tensor:
    """γ = σ(g) as (1, H, 1, 1) in ``dtype``; the default g when ``params`` lacks ``window_gate``."""
    g = None if params is None else params.get("window_gate")
    if g is None:
        return torch.full((1, heads, 1, 1), 1.0 / (1.0 + math.exp(-GATE_INIT)), dtype=dtype, device=device)
    return torch.sigmoid(g.to(dtype)).reshape(1, heads, 1, 1)


def effective_window(window: int, s_len, t_len) -> int:
    """Clamp w to max(S, T) when the lengths are concrete (eager); beyond that the window already covers all keys."""
    if isinstance(s_len, int) and isinstance(t_len, int):
        return min(window, max(s_len, t_len, 1))
    return window


def window_softmax_terms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int,
    causal: bool,
    key_padding: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_win e_ij v_j (B,H,S,Dv), Σ_win e_ij (B,H,S,1)) with e_ij = exp(s q_i·k_j − c_i); inputs in compute dtype."""
    s_len, t_len = q.shape[-2], k.shape[-2]
    dev = q.device
    if causal:
        offs = torch.arange(window, device=dev) - (window - 1)  # −w+1 .. 0
    else:
        offs = torch.arange(2 * window - 1, device=dev) - (window - 1)  # −w+1 .. w−1
    p = torch.arange(s_len, device=dev) + (t_len - s_len)
    idx = p.unsqueeze(-1) + offs.unsqueeze(0)  # (S, R)
    valid = (idx >= 0) & (idx < t_len)
    idx_c = idx.clamp(0, t_len - 1)
    kg = k[:, :, idx_c]  # (B,H,S,R,D)
    vg = v[:, :, idx_c]  # (B,H,S,R,Dv)
    keep = valid.unsqueeze(0).unsqueeze(0)  # (1,1,S,R)
    if key_padding is not None:
        keep = keep & key_padding.to(torch.bool)[:, idx_c].unsqueeze(1)  # (B,1,S,R)
    return softmax_terms(q, kg, vg, keep, scale=scale)


def softmax_terms(q: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, keep: torch.Tensor, *, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The window's softmax terms over gathered keys: (Σ_r e_r vg_r, Σ_r e_r) with e_r = exp(s q·kg_r − c) where
    ``keep``, 0 elsewhere, c = the largest kept logit.

    q (B,H,S,D); kg (B,H,S,R,D) and vg (B,H,S,R,Dv), the R window keys/values of each query (any axis may be 1 and
    broadcast: the decode step passes its (B,Hkv,1,W,D) key buffer with q grouped as (B,Hkv,G,D)); keep (…,S,R)
    bool, broadcast against the logits (B,H,S,R). → ((B,H,S,Dv), (B,H,S,1)) in q's dtype. Rows with nothing kept
    give 0 and 0 (:func:`mix` then returns the rest operator's output)."""
    logits = (kg @ q.unsqueeze(-1)).squeeze(-1) * scale  # (B,H,S,R)
    low = torch.finfo(logits.dtype).min
    masked = torch.where(keep, logits, torch.full((), low, dtype=logits.dtype, device=q.device))
    c = masked.amax(-1, keepdim=True)
    e = torch.exp(masked - c) * keep.to(logits.dtype)
    num = (e.unsqueeze(-2) @ vg).squeeze(-2)
    return num, e.sum(-1, keepdim=True)


def mix(
    win_num: torch.Tensor,
    win_den: torch.Tensor,
    rest_num: torch.Tensor,
    rest_mass: torch.Tensor,
    rest_out: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """(γ win_num + rest_num) / (γ win_den + rest_mass), or ``rest_out`` where the window is empty."""
    has_win = win_den > 0
    den = gamma * win_den + rest_mass
    out = (gamma * win_num + rest_num) / torch.where(has_win, den, torch.ones_like(den))
    return torch.where(has_win, out, rest_out)
