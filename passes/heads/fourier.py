"""Fourier head (Gillman et al., ICLR 2025, arXiv 2410.22269) in real arithmetic, so it exports to ONNX.

Forward, for features f (N, D), m bins and N_f frequencies (``n_freq``):

1. ``Linear(D → 2(N_f+1))`` (initial weights divided by ``init_w_div``, biases by ``init_b_div``), split into
   c = u + i·v ∈ C^{N_f+1} (u: the first N_f+1 outputs, v: the rest).
2. Autocorrelation a_k = Σ_{j=0}^{N_f−k} c_{j+k} conj(c_j), k = 0..N_f, in real form:
   Re a_k = Σ_j (u_{j+k} u_j + v_{j+k} v_j), Im a_k = Σ_j (v_{j+k} u_j − u_{j+k} v_j).
3. ã_k = a_k / Re a_0 (Re a_0 = Σ|c_j|² guarded: all-zero c gives the uniform density).
4. Density on [−1, 1]: p(x) = ½ + Σ_{k≥1} [Re ã_k cos(πkx) − Im ã_k sin(πkx)] = |Σ_j c_j e^{iπjx}|²/(2 a_0) ≥ 0,
   ∫ p = 1.
5. Bin centres x_j = −1 + (2j+1)/m; q_j = p(x_j)/Σ_l p(x_l).
6. Output logits log(q_j + ε) (ε = ``inv_softmax_eps``), so softmax / cross-entropy consumers work unchanged;
   softmax(logits) = (q + ε)/(1 + mε).
7. Regulariser R = γ · 2 · mean_batch Σ_k 2π²k² |a_k|² (unnormalised a_k); the training loss is CE + R
   (:func:`passes.heads.losses.fourier_nll`).

``class_order`` is a permutation mapping class ids to bins (class c sits at bin ``class_order[c]``). The head is
meaningful only for ordinal or quantised targets; on unordered classes it imposes a false smoothness prior.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import ClassOrderError

log = logging.getLogger(__name__)

DEFAULT_GAMMA = 1e-6
DEFAULT_EPS = 1e-5
#: Smallest Re a_0 used as a divisor (step 3's guard).
A0_FLOOR = 1e-30


def default_n_freq(m_bins: int) -> int:
    """The starting number of frequencies for m bins: m/4 (inside the m/8…m/2 grid), at least 1."""
    return max(1, m_bins // 4)


def bin_centres(m_bins: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x_j = −1 + (2j+1)/m, j = 0..m−1."""
    return -1.0 + (2.0 * torch.arange(m_bins, dtype=dtype) + 1.0) / m_bins


def check_class_order(order: Sequence[int] | None, m_bins: int) -> list[int] | None:
    """``order`` as a list if it is a permutation of 0..m−1 (else :class:`ClassOrderError`); None stays None."""
    if order is None:
        return None
    out = [int(i) for i in order]
    if sorted(out) != list(range(m_bins)):
        raise ClassOrderError(f"class_order {out} is not a permutation of the {m_bins} bins 0..{m_bins - 1}")
    return out


def split_coefficients(params: torch.Tensor, n_freq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v): real and imaginary parts of c from the linear output (…, 2(N_f+1))."""
    return params[..., :n_freq + 1], params[..., n_freq + 1:]


def _shift_index(n_freq: int) -> torch.Tensor:
    k = torch.arange(n_freq + 1)
    return k[:, None] + k[None, :]  # [k, j] -> j + k, reads a zero-padded row


def autocorrelation(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Re a, Im a), each (…, N_f+1): a_k = Σ_j c_{j+k} conj(c_j) for c = u + i v."""
    n_freq = u.shape[-1] - 1
    index = _shift_index(n_freq).to(u.device)
    u_pad = torch.cat([u, torch.zeros_like(u[..., 1:])], dim=-1)
    v_pad = torch.cat([v, torch.zeros_like(v[..., 1:])], dim=-1)
    u_shift, v_shift = u_pad[..., index], v_pad[..., index]  # (…, k, j) = u_{j+k}
    u_j, v_j = u.unsqueeze(-2), v.unsqueeze(-2)
    re = (u_shift * u_j + v_shift * v_j).sum(-1)
    im = (v_shift * u_j - u_shift * v_j).sum(-1)
    return re, im


def normalized(re: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Re ã_k, Im ã_k) for k = 1..N_f: a_k / Re a_0, with Re a_0 floored at :data:`A0_FLOOR`."""
    a0 = re[..., :1].clamp_min(A0_FLOOR)
    return re[..., 1:] / a0, im[..., 1:] / a0


def trig_tables(n_freq: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(πkx), sin(πkx) for k = 1..N_f (rows) at the points ``x`` (columns)."""
    k = torch.arange(1, n_freq + 1, dtype=x.dtype)[:, None]
    return torch.cos(math.pi * k * x[None, :]), torch.sin(math.pi * k * x[None, :])


def density(re_n: torch.Tensor, im_n: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """p at the points of the tables: ½ + Re ã · cos − Im ã · sin."""
    return 0.5 + re_n @ cos.to(re_n.dtype) - im_n @ sin.to(re_n.dtype)


def regularizer(re: torch.Tensor, im: torch.Tensor, gamma: float) -> torch.Tensor:
    """R = γ · 2 · mean_batch Σ_k 2π²k² |a_k|² over the unnormalised autocorrelation."""
    k = torch.arange(re.shape[-1], dtype=re.dtype, device=re.device)
    per_sample = (2.0 * math.pi ** 2 * k * k * (re * re + im * im)).sum(-1)
    return gamma * 2.0 * per_sample.mean()


class FourierHead(nn.Module):
    """Fourier head over ``m_bins`` bins with ``n_freq`` frequencies; ``forward`` returns logits log(q + ε) (N, m)
    with classes in ``class_order`` (identity when None, with a logged warning)."""

    def __init__(self, dim_in: int, m_bins: int, n_freq: int | None = None, gamma: float = DEFAULT_GAMMA,
                 inv_softmax_eps: float = DEFAULT_EPS, init_w_div: float = 100.0, init_b_div: float = 100.0,
                 class_order: Sequence[int] | None = None) -> None:
        super().__init__()
        if m_bins < 2:
            raise ClassOrderError(f"a Fourier head needs at least 2 bins, got {m_bins}")
        self.m_bins = int(m_bins)
        self.n_freq = int(n_freq if n_freq is not None else default_n_freq(m_bins))
        if self.n_freq < 1:
            raise ClassOrderError(f"n_freq must be >= 1, got {self.n_freq}")
        self.gamma, self.eps = float(gamma), float(inv_softmax_eps)
        self.linear = nn.Linear(dim_in, 2 * (self.n_freq + 1))
        with torch.no_grad():
            self.linear.weight.div_(init_w_div)
            self.linear.bias.div_(init_b_div)
        order = check_class_order(class_order, self.m_bins)
        if order is None:
            log.warning("Fourier head without class_order: class ids are taken as the bin order (meaningful only "
                        "for ordinal or quantised targets)")
        self.class_order = order
        cos, sin = trig_tables(self.n_freq, bin_centres(self.m_bins, torch.float64))
        # float64 tables (cast to the features' dtype where used) so a .double() head keeps full precision
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("order", torch.tensor(order if order is not None else list(range(self.m_bins))),
                             persistent=False)

    def coefficients(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_coefficients(self.linear(features), self.n_freq)

    def autocorrelation(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return autocorrelation(*self.coefficients(features))

    def bin_probs(self, features: torch.Tensor) -> torch.Tensor:
        """q (N, m) in bin order."""
        re_n, im_n = normalized(*self.autocorrelation(features))
        p = density(re_n, im_n, self.cos, self.sin).clamp_min(0.0)
        return p / p.sum(-1, keepdim=True)

    def pdf(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """p(x) (N, len(x)) on [−1, 1] at the points ``x``."""
        re_n, im_n = normalized(*self.autocorrelation(features))
        cos, sin = trig_tables(self.n_freq, x.to(re_n.dtype))
        return density(re_n, im_n, cos, sin)

    def logits_and_reg(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits log(q + ε), regulariser R) for training: the loss is CE(logits) + R."""
        re, im = self.autocorrelation(features)
        re_n, im_n = normalized(re, im)
        p = density(re_n, im_n, self.cos, self.sin).clamp_min(0.0)
        q = p / p.sum(-1, keepdim=True)
        return torch.log(q + self.eps)[..., self.order], regularizer(re, im, self.gamma)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        q = self.bin_probs(features)
        return torch.log(q + self.eps)[..., self.order]


def smoothness(p: np.ndarray) -> np.ndarray:
    """s(p) = Σ_{σ=1}^{100} 6/(π²σ²) ‖p − G_σ ∗ p‖₂ over the last axis (Gaussian filter truncated at 4σ, wrap
    mode, like ``scipy.ndimage.gaussian_filter1d(mode="wrap")``); lower is smoother. Returns one value per row."""
    p = np.asarray(p, dtype=np.float64)
    m = p.shape[-1]
    total = np.zeros(p.shape[:-1])
    for sigma in range(1, 101):
        radius = int(4.0 * sigma + 0.5)
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel /= kernel.sum()
        wrapped = np.zeros(m)
        np.add.at(wrapped, offsets % m, kernel)  # the kernel folded onto the circle
        circulant = wrapped[(np.arange(m)[:, None] - np.arange(m)[None, :]) % m]  # [i, l] = w(i − l)
        smoothed = p @ circulant.T
        total += 6.0 / (math.pi ** 2 * sigma ** 2) * np.linalg.norm(p - smoothed, axis=-1)
    return total
