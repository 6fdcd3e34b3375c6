"""BiViT operators and modules against numpy references and the spec's §9.4 properties."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from passes.binarize import ops
from passes.binarize.modules import BinaryAttention, BinaryLinear, FrozenBinaryLinear


def np_sign(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 1.0, -1.0).astype(np.float32)


def test_sign_maps_zero_to_plus_one_and_has_two_levels():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, 3.0])
    for f in (ops.sign_pm, ops.sign_ste, ops.sign_deploy):
        y = f(x)
        assert y.tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0, 1.0]


def test_activation_ste_gradient_is_clipped():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([-1.0, 1.0, 0.0, 0.999, -0.999, 1.001, -5.0]), torch.randn(200, generator=g) * 2])
    x.requires_grad_(True)
    upstream = torch.randn(x.shape, generator=g)
    (ops.sign_ste(x) * upstream).sum().backward()
    inside = x.detach().abs() < 1
    assert torch.equal(x.grad[~inside], torch.zeros_like(x.grad[~inside]))  # zero where |x| >= 1 (±1 included)
    assert torch.equal(x.grad[inside], upstream[inside])  # the upstream gradient inside


@pytest.mark.parametrize("seed", range(5))
def test_every_binarised_row_takes_exactly_plus_minus_alpha(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 13, generator=g) * 0.1 + torch.randn(7, 1, generator=g)  # rows with offsets: mean matters
    w[3] = 0.25  # a constant row: W − mean = 0 everywhere → all +α
    lin = BinaryLinear(w, None, binarize_input=True)
    wb = lin.binary_weight().detach()
    for r in range(7):
        a = float(lin.alpha.detach()[r])
        values = set(wb[r].tolist())
        assert values <= {a, -a}, (r, values, a)
        if r != 3:
            assert values == {a, -a}
    assert set(wb[3].tolist()) == {float(lin.alpha.detach()[3])}
    frozen = lin.freeze()
    assert set(frozen.signs.unique().tolist()) <= {-1.0, 1.0}


def test_alpha_is_initialised_from_mean_abs_weight_at_construction():
    w = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    lin = BinaryLinear(w, None, binarize_input=False)
    np.testing.assert_allclose(lin.alpha.detach().numpy(), np.abs(w.numpy()).mean(axis=1), rtol=1e-6)
    assert isinstance(lin.alpha, torch.nn.Parameter)  # learnable, present before any forward


@pytest.mark.parametrize("binarize_input", [True, False])
def test_binary_projection_matches_numpy(binarize_input):
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(6, 10, generator=g), torch.randn(6, generator=g)
    x = torch.randn(3, 4, 10, generator=g)
    x[0, 0, :3] = 0.0  # exact zeros: sign must give +1
    lin = BinaryLinear(w, b, binarize_input=binarize_input)
    with torch.no_grad():
        lin.alpha.mul_(torch.linspace(0.5, 2.0, 6))  # a trained α, not the initial one
    wn, xn = w.numpy(), x.numpy()
    wb = lin.alpha.detach().numpy()[:, None] * np_sign(wn - wn.mean(axis=1, keepdims=True))
    a = np_sign(xn) if binarize_input else xn
    ref = a @ wb.T + b.numpy()
    with torch.no_grad():
        np.testing.assert_allclose(lin(x).numpy(), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lin.freeze()(x).numpy(), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(lin.freeze(), FrozenBinaryLinear)


def test_sab_is_binary_keeps_ties_and_at_least_one_per_row():
    p = torch.tensor([[0.4, 0.1, 0.1, 0.4],     # two maxima; 0.1 = 0.25 · 0.4 exactly at the threshold → kept
                      [0.97, 0.01, 0.01, 0.01],
                      [0.25, 0.25, 0.25, 0.25]])
    b = ops.sab(p, 0.25)
    assert b.tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    g = torch.Generator().manual_seed(3)
    for ratio in (0.1, 0.25, 0.5, 1.0):
        p = torch.softmax(torch.randn(4, 3, 9, 9, generator=g) * 3, dim=-1)
        b = ops.sab(p, ratio)
        assert set(b.unique().tolist()) <= {0.0, 1.0}
        assert bool((b.sum(-1) >= 1).all())
        ref = (p.numpy() >= ratio * p.numpy().max(axis=-1, keepdims=True)).astype(np.float32)
        np.testing.assert_array_equal(b.numpy(), ref)
        np.testing.assert_array_equal(ops.sab_deploy(p, ratio).numpy(), ref)


def test_sab_backward_equals_softmax_backward():
    g = torch.Generator().manual_seed(4)
    s1 = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    upstream = torch.randn(2, 3, 5, 5, generator=g)
    (ops.sab(torch.softmax(s1, -1), 0.25) * upstream).sum().backward()
    (torch.softmax(s2, -1) * upstream).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=0)


def test_binary_attention_matches_numpy_and_its_deploy_form():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g) for _ in range(3))
    att = BinaryAttention(scale=0.5, ratio=0.25)
    qs, ks, vs = np_sign(q.numpy()), np_sign(k.numpy()), np_sign(v.numpy())
    s = qs @ ks.transpose(0, 1, 3, 2) * 0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = (p >= 0.25 * p.max(-1, keepdims=True)).astype(np.float32) @ vs
    with torch.no_grad():
        np.testing.assert_allclose(att(q, k, v).numpy(), ref, atol=1e-6)
        np.testing.assert_allclose(att.freeze()(q, k, v).numpy(), ref, atol=1e-6)
        # K given transposed (the site binds Kᵀ)
        att_t = BinaryAttention(scale=0.5, ratio=0.25, k_transposed=True)
        np.testing.assert_allclose(att_t(q, k.transpose(-2, -1), v).numpy(), ref, atol=1e-6)
