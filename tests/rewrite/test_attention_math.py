"""Softmax attention is written once (rewrite.attention_math): the reference variant and the lowering's SDPA
expansion are that formula; it agrees with the naive formula and with torch's SDPA (top-left causal, fully masked
rows 0)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rewrite.attention_math import softmax_attention


def _naive(q, k, v, scale, keep=None, bias=None):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    w = torch.exp(s - s.amax(-1, keepdim=True))
    if keep is not None:
        w = w * keep
    den = w.sum(-1, keepdim=True)
    return ((w / torch.where(den > 0, den, torch.ones_like(den))) @ v.double()).float()


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    return torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)


def test_against_naive_formula_every_mask(qkv):
    q, k, v = qkv
    torch.testing.assert_close(softmax_attention(q, k, v, scale=0.3), _naive(q, k, v, 0.3), atol=1e-5, rtol=1e-5)
    i, j = torch.arange(5)[:, None], torch.arange(7)[None, :]
    for align, keep in (("bottom_right", j <= i + 2), ("top_left", j <= i)):
        got = softmax_attention(q, k, v, scale=0.3, causal=True, causal_align=align)
        torch.testing.assert_close(got, _naive(q, k, v, 0.3, keep), atol=1e-5, rtol=1e-5)
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, 4:] = False
    got = softmax_attention(q, k, v, scale=0.3, key_padding=pad)
    torch.testing.assert_close(got, _naive(q, k, v, 0.3, pad[:, None, None, :]), atol=1e-5, rtol=1e-5)
    bias = torch.randn(2, 1, 5, 7)
    bias[..., -2:] = float("-inf")
    got = softmax_attention(q, k, v, scale=0.3, attn_mask=bias)
    keep = bias > -1e4
    torch.testing.assert_close(got, _naive(q, k, v, 0.3, keep, torch.where(keep, bias, 0)), atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_give_zero(qkv):
    q, k, v = qkv
    keep = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    keep[0, 0, 2] = False
    out = softmax_attention(q, k, v, scale=0.3, attn_mask=keep)
    assert torch.all(out[0, :, 2] == 0) and torch.isfinite(out).all()
    additive = torch.where(keep, 0.0, float("-inf"))
    torch.testing.assert_close(softmax_attention(q, k, v, scale=0.3, attn_mask=additive), out)


def test_reference_variant_is_the_formula(qkv):
    from passes.attention.reference import reference_attention
    q, k, v = qkv
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[0, 5:] = False
    assert torch.equal(reference_attention(q, k, v, scale=0.4, causal=True, key_padding=pad),
                       softmax_attention(q, k, v, scale=0.4, causal=True, key_padding=pad))


def test_lowering_sdpa_expansion_matches_torch_sdpa():
    from targets.torch_normalize import sdpa_math
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[1, 0, 3] = False  # a fully masked row: 0 in torch's safe softmax and in the formula
    for kwargs in ({"is_causal": True}, {"attn_mask": mask}, {"attn_mask": mask.float() * -3.0}, {"scale": 0.2}):
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
        torch.testing.assert_close(sdpa_math(q, k, v, **kwargs), want, atol=1e-5, rtol=1e-5)
