"""The Fourier head on an ordinal task (the spec's toy): 10 contexts, each with a smooth multimodal target
distribution over m = 50 ordered bins, a few labels sampled per context. A softmax head and the Fourier head
(``head.fourier`` replacing it) are trained the same way (Adam, same steps, rate, batch and fit split) on the same
frozen context features. The Fourier head's pdf is a density, and it is closer to the true distribution (KL) and
smoother (the paper's s(p)) than the softmax head, which fits the sampled histogram."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from passes.heads import fourier
from passes.heads.training import train_head
from rewrite.api import convert
from rewrite.fit_data import FitData
from rewrite.io import export_module

M, D, CONTEXTS, PER_CONTEXT = 50, 16, 10, 40
TRAIN = {"steps": 1500, "lr": 1e-2, "batch": 128, "seed": 0}


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, M)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _toy(seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = fourier.bin_centres(M).numpy()
    truth = []
    for _ in range(CONTEXTS):  # a two-component Gaussian mixture per context, discretized on the bins
        mu, sd, w = rng.uniform(-0.7, 0.7, 2), rng.uniform(0.12, 0.3, 2), rng.uniform(0.3, 0.7)
        p = w * np.exp(-0.5 * ((centres - mu[0]) / sd[0]) ** 2) / sd[0] + \
            (1 - w) * np.exp(-0.5 * ((centres - mu[1]) / sd[1]) ** 2) / sd[1]
        truth.append(p / p.sum())
    truth = np.array(truth)
    embed = rng.normal(size=(CONTEXTS, D)).astype(np.float32)
    ctx = np.repeat(np.arange(CONTEXTS), PER_CONTEXT)
    y = np.array([rng.choice(M, p=truth[c]) for c in ctx])
    return truth, embed, ctx, y


def _kl(p, q):
    return float(np.mean(np.sum(p * (np.log(p + 1e-300) - np.log(q)), axis=-1)))


def test_fourier_head_beats_softmax_on_an_ordinal_toy():
    truth, embed, ctx, y = _toy()
    x = embed[ctx]
    fit_part, _ = FitData({"x": x}, y).split(0.2, TRAIN["seed"])
    torch.manual_seed(0)
    softmax_head = Head().double()
    train_head(softmax_head, lambda m, f, t: nn.functional.cross_entropy(m(f), t),
               torch.from_numpy(fit_part.inputs["x"]).double(), torch.from_numpy(fit_part.y), **TRAIN)
    softmax_head = softmax_head.float().eval()
    loaded = export_module(softmax_head, {"x": torch.from_numpy(embed)},
                           dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=4096)}})
    new, report = convert(loaded, head="fourier", fit={"x": x, "y": y},
                          options={"ordinal": True, "n_freq": 12, "progress": False, **TRAIN})
    with torch.no_grad():
        q_soft = torch.softmax(softmax_head(torch.from_numpy(embed)), -1).double().numpy()
        logits = new.ep.module()(x=torch.from_numpy(embed))
    q_four = torch.softmax(logits.double(), -1).numpy()  # = (q + 1e-5)/(1 + m·1e-5)
    kl_soft, kl_four = _kl(truth, q_soft), _kl(truth, q_four)
    s_soft, s_four = fourier.smoothness(q_soft).mean(), fourier.smoothness(q_four).mean()
    print(f"KL softmax {kl_soft:.4f} fourier {kl_four:.4f}; s(p) softmax {s_soft:.4f} fourier {s_four:.4f} "
          f"truth {fourier.smoothness(truth).mean():.4f}")
    assert kl_four < kl_soft and s_four < s_soft
    assert report["passes"][0]["sites"][0]["fit"]["n_freq"] == 12


def test_trained_fourier_pdf_is_a_density():
    truth, embed, ctx, y = _toy(1)
    torch.manual_seed(0)
    head = fourier.FourierHead(D, M, 12).double()
    from passes.heads.losses import fourier_loss
    train_head(head, fourier_loss, torch.from_numpy(embed[ctx]).double(), torch.from_numpy(y), **TRAIN)
    grid = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    with torch.no_grad():
        p = head.pdf(torch.from_numpy(embed).double(), grid)
    assert float(p.min()) >= -1e-12
    np.testing.assert_allclose(torch.trapezoid(p, grid, dim=-1).numpy(), 1.0, atol=1e-6)
    assert math.isfinite(float(p.max()))
