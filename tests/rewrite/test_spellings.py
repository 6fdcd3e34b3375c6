"""Spellings beyond the zoo: the fp16 upcast around softmax (Cast → Softmax → Cast)."""
from __future__ import annotations

import torch

import rewrite


class UpcastBlock(torch.nn.Module):
    """Explicit attention in fp16 with the softmax computed in fp32 (Cast → Softmax → Cast)."""

    def forward(self, q, k, v):
        scores = (q @ k.transpose(-2, -1)) / 4.0
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v


def test_fp16_upcast_around_softmax():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    report = rewrite.inspect(UpcastBlock(), (q, q, q))
    (site,) = report.attention_sites
    assert site.scale == 0.25 and site.dtype == "float16" and site.mask == "none"
    _, conv = rewrite.convert(UpcastBlock(), attention="reference", example_inputs=(q, q, q))
    assert conv["fidelity"]["max_abs"] < 2e-3  # fp16 outputs of magnitude ~1
