"""Attention sites whose query and key lengths differ (KV-cache decode graphs, S != T): a causal site is rewritten
only when its alignment is known to be bottom-right (query i sees key j iff j <= i + T - S, the replacements'
reading), and refused with a reason otherwise (a top-left triangle, SDPA's top-left ``is_causal``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rewrite
from rewrite.errors import NoSitesError
from rewrite.graph.fx import FxGraph
from rewrite.recognize import recognize

B, T, S, D, H = 2, 12, 4, 16, 2
HD = D // H


class DecodeBlock(torch.nn.Module):
    """Explicit softmax attention of the last S positions (queries) over all T positions (keys/values), as a
    KV-cache decode step computes it. ``mask``: "bottom_right" (a constant drop buffer), "bottom_right_keep" (the
    negation of a constant keep buffer in the graph), "top_left" (tril of ones (S, T) in the graph) or "sdpa" (``is_causal=True``, top-left for S != T)."""

    def __init__(self, mask: str):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(D, D) for _ in range(3))
        self.mask = mask
        keep = torch.ones(S, T, dtype=torch.bool).tril(T - S)  # bottom-right: j <= i + T - S
        self.register_buffer("keep", keep)
        self.register_buffer("drop", ~keep)

    def forward(self, x):
        b = x.shape[0]
        q = self.q(x[:, T - S:]).view(b, S, H, HD).transpose(1, 2)
        k = self.k(x).view(b, T, H, HD).transpose(1, 2)
        v = self.v(x).view(b, T, H, HD).transpose(1, 2)
        if self.mask == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) * HD ** -0.5
            if self.mask == "bottom_right":  # a constant drop pattern: its alignment is readable
                drop = self.drop
            elif self.mask == "bottom_right_keep":  # computed from a constant (not folded): an arbitrary mask
                drop = ~self.keep
            else:
                drop = ~torch.ones(S, T, dtype=torch.bool).tril()
            y = scores.masked_fill(drop, float("-inf")).softmax(-1) @ v
        return y.transpose(1, 2).reshape(b, S, D)


def _naive_linear_bottom_right(block: DecodeBlock, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """elu+1 linear attention, written from the formula with an explicit bottom-right (S, T) mask, fp64."""
    x = x.double()
    q = F.linear(x[:, T - S:], block.q.weight.double(), block.q.bias.double()).view(B, S, H, HD).transpose(1, 2)
    k = F.linear(x, block.k.weight.double(), block.k.bias.double()).view(B, T, H, HD).transpose(1, 2)
    v = F.linear(x, block.v.weight.double(), block.v.bias.double()).view(B, T, H, HD).transpose(1, 2)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    out = torch.zeros(B, H, S, HD, dtype=torch.float64)
    for i in range(S):
        for j in range(T):
            if j <= i + T - S:
                w = (fq[:, :, i] * fk[:, :, j]).sum(-1, keepdim=True)
                out[:, :, i] += w * v[:, :, j]
        den = sum((fq[:, :, i] * fk[:, :, j]).sum(-1, keepdim=True) for j in range(T) if j <= i + T - S)
        out[:, :, i] /= den + eps
    return out.transpose(1, 2).reshape(B, S, D).float()


@pytest.mark.parametrize("mask,kind", [("bottom_right", "causal"), ("bottom_right_keep", "boolean")])
def test_bottom_right_mask_rewritten_and_matches_naive(mask, kind):
    """The constant bottom-right pattern is recognized as causal (O(N) form, bottom-right); a mask the recognizer
    cannot read as a constant stays an arbitrary boolean mask (exact fallback). Both match the naive reference."""
    block = DecodeBlock(mask).eval()
    x = torch.randn(B, T, D)
    model, report = rewrite.convert(block, attention="linear", example_inputs=(x,))
    (site,) = report["passes"][0]["sites"]
    assert site["status"] == "replaced", site
    assert site["mask"] == kind and site["causal"] == (kind == "causal"), site
    x2 = torch.randn(B, T, D)
    with torch.no_grad():
        got = model.ep.module()(x2)
    ref = _naive_linear_bottom_right(block, x2)
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    # and a top-left reading of the same site would differ (the test can tell the alignments apart)
    with torch.no_grad():
        q = block.q(x2[:, T - S:]).view(B, S, H, HD).transpose(1, 2)
        k = block.k(x2).view(B, T, H, HD).transpose(1, 2)
        v = block.v(x2).view(B, T, H, HD).transpose(1, 2)
        from passes.attention.linear import linear_attention
        keep_tl = torch.ones(S, T, dtype=torch.bool).tril()
        top_left = linear_attention(q, k, v, scale=HD ** -0.5, attn_mask=keep_tl).transpose(1, 2).reshape(B, S, D)
    assert (top_left - ref).abs().max() > 1e-3


@pytest.mark.parametrize("mask,words", [("top_left", "arange comparisons / a triangle op"),
                                        ("sdpa", "top-left")])
def test_unverifiable_alignment_refused_with_reason(mask, words):
    block = DecodeBlock(mask).eval()
    x = torch.randn(B, T, D)
    with pytest.raises(NoSitesError):
        rewrite.convert(block, attention="linear", example_inputs=(x,))
    ep = torch.export.export(block, (x,))
    rec = recognize(FxGraph(ep.module()))
    assert not rec.attention_sites
    reasons = " | ".join(str(r) for _, r in rec.unmatched)
    assert f"query length {S} != key length {T}" in reasons and words in reasons, reasons
