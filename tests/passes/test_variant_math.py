"""Attention variants against independent naive O(N²) float64 references written from the papers' formulas, plus
the properties each variant promises. The references below use numpy only and share no code with the library."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from passes.attention import VARIANTS, get_variant
from passes.attention.featuremaps import hedgehog, init_hedgehog, taylor2
from passes.attention.linear import linear_attention
from passes.attention.mala import mala_attention
from passes.attention.sigmoid import sigmoid_attention, sigmoid_bias
from passes.attention.soft import newton_schulz_inverse, soft_attention
from passes.attention.softplus import softplus_attention

SCALE = 8 ** -0.5

# ----------------------------------------------------------------------------------------------- naive references


def _np(x):
    return x.detach().to(torch.float64).numpy()


def naive_mask(b, s, t, causal, kp):
    m = np.ones((b, 1, s, t))
    if causal:
        i = np.arange(s)[:, None]
        j = np.arange(t)[None, :]
        m = m * (j <= i + t - s)
    if kp is not None:
        m = m * _np(kp.float())[:, None, None, :]
    return m


def elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(x))


def naive_softmax(q, k, v, m, scale):
    lg = scale * q @ np.swapaxes(k, -1, -2)
    lg = np.where(m > 0, lg, -np.inf)
    mx = np.max(lg, -1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(lg - mx) * m
    den = e.sum(-1, keepdims=True)
    return (e @ v) / np.where(den > 0, den, 1.0)


def naive_linear(q, k, v, m, eps=1e-6):
    a = (elu1(q) @ np.swapaxes(elu1(k), -1, -2)) * m
    return (a @ v) / (a.sum(-1, keepdims=True) + eps)


def naive_mala_weights(q, k, m, scale, eps=1e-6):
    n = np.maximum(m.sum(-1, keepdims=True), 1.0)
    a = scale / n * (elu1(q) @ np.swapaxes(elu1(k), -1, -2)) * m
    z = a.sum(-1, keepdims=True)
    return a * (1.0 + 1.0 / (z + eps)) - z / n * m


def naive_mala(q, k, v, m, scale, eps=1e-6):
    return naive_mala_weights(q, k, m, scale, eps) @ v


def naive_sigmoid(q, k, v, m, scale, n_ref=2048):
    w = 1.0 / (1.0 + np.exp(-(scale * q @ np.swapaxes(k, -1, -2) - math.log(n_ref)))) * m
    return w @ v


def naive_lssa_weights(q, k, m):
    d = q.shape[-1]
    qh = q / np.linalg.norm(q, axis=-1, keepdims=True)
    kh = k / np.linalg.norm(k, axis=-1, keepdims=True)
    n = m.sum(-1, keepdims=True)
    arg = math.log(d) * np.log(np.maximum(n, 1)) * (qh @ np.swapaxes(kh, -1, -2))
    a = np.log1p(np.exp(arg)) * m
    s = a.sum(-1, keepdims=True)
    return a / np.where(s > 0, s, 1.0), n


def naive_lssar_weights(q, k, m, p):
    a, n = naive_lssa_weights(q, k, m)
    o = (n > 3).astype(float)
    x = np.maximum(n * a - o, 0.0) * m
    xp = x ** p
    s = xp.sum(-1, keepdims=True)
    return np.where(s > 0, xp / np.where(s > 0, s, 1.0), m / np.maximum(n, 1))


def naive_gauss(a, b, scale):
    d2 = ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1)
    return np.exp(-0.5 * scale * d2)


def naive_segments(x, m):
    n = x.shape[-2]
    out = []
    for ell in range(m):
        lo = (ell * n) // m
        hi = max(((ell + 1) * n) // m, lo + 1)
        out.append(x[..., lo:hi, :].mean(-2))
    return np.stack(out, -2)


def naive_soft(q, k, v, scale, m_land, ridge=0.01):
    lq, lk = naive_segments(q, m_land), naive_segments(k, m_land)
    k1, k2, k3 = naive_gauss(q, lk, scale), naive_gauss(lq, lk, scale), naive_gauss(lq, k, scale)
    inv = np.linalg.pinv(k2 + ridge * np.eye(m_land))
    return k1 @ inv @ (k3 @ v)


NAIVE = {
    "reference": lambda q, k, v, m: naive_softmax(q, k, v, m, SCALE),
    "linear": lambda q, k, v, m: naive_linear(q, k, v, m),
    "mala": lambda q, k, v, m: naive_mala(q, k, v, m, SCALE),
    "sigmoid": lambda q, k, v, m: naive_sigmoid(q, k, v, m, SCALE),
    "softplus": lambda q, k, v, m: naive_lssa_weights(q, k, m)[0] @ v,
    "soft": lambda q, k, v, m: naive_soft(q, k, v, SCALE, 8),
}
OPTIONS = {"soft": {"num_landmarks": 8, "iterations": 40}}


def _qkv(b, h, s, t, d=8, dv=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, dd, generator=g) for n, dd in ((s, d), (t, d), (t, dv)))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _kp(b, t):
    kp = torch.ones(b, t, dtype=torch.bool)
    kp[0, -5:] = False
    if b > 1:
        kp[1, :3] = False  # left padding
    return kp


# ----------------------------------------------------------------------------------------------- against naive

MATH_CASES = []
for _name, _var in VARIANTS.items():
    for _kind in ("none", "causal", "key_padding", "causal+key_padding"):
        if set(_kind.split("+")) <= _var.mask_kinds:
            for _dt in ("float32", "float16", "bfloat16"):
                MATH_CASES.append((_name, _kind, _dt))


@pytest.mark.parametrize("name,kind,dtype", MATH_CASES)
def test_variant_matches_naive(name, kind, dtype):
    dt = getattr(torch, dtype)
    causal = "causal" in kind
    shapes = [(19, 19), (7, 19)] if causal else [(19, 19), (11, 23)]
    for s, t in shapes:
        q, k, v = _qkv(2, 3, s, t, dtype=dt, seed=s * 100 + t)
        kp = _kp(2, t) if "key_padding" in kind else None
        out = get_variant(name).fn(q, k, v, scale=SCALE, causal=causal, key_padding=kp, **OPTIONS.get(name, {}))
        assert out.dtype == dt and out.shape == (2, 3, s, 8)
        assert torch.isfinite(out).all()
        ref = NAIVE[name](_np(q), _np(k), _np(v), naive_mask(2, s, t, causal, kp))
        tol = 1e-5 if dt == torch.float32 else 1e-2
        scale_ref = max(1.0, np.abs(ref).max())
        err = np.abs(_np(out) - ref).max() / scale_ref
        assert err <= tol, f"{name} {kind} {dtype} ({s},{t}): {err:.2e}"


def test_arbitrary_masks_match_naive():
    q, k, v = _qkv(2, 2, 13, 13, seed=5)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, 13, 13, generator=g) > 0.4
    keep[0, 0, 3] = False  # a fully masked row → 0
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    m = _np(keep.float())
    for name in ("reference", "linear", "mala", "sigmoid", "softplus"):
        kinds = VARIANTS[name].mask_kinds
        assert "arbitrary" in kinds or "boolean" in kinds
        out = VARIANTS[name].fn(q, k, v, scale=SCALE, causal=False, key_padding=None, attn_mask=additive)
        ref = NAIVE[name](_np(q), _np(k), _np(v), m)
        assert np.abs(_np(out) - ref).max() <= 1e-5 * max(1, np.abs(ref).max()), name
        assert torch.all(out[0, :, 3] == 0), name


# ----------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_linear_causal_forms_agree(dtype, tol):
    q, k, v = _qkv(1, 2, 100, 100, dtype=dtype, seed=3)
    ref = naive_linear(_np(q), _np(k), _np(v), naive_mask(1, 100, 100, True, None))
    outs = [linear_attention(q, k, v, scale=SCALE, causal=True, causal_form="prefix")]
    outs += [linear_attention(q, k, v, scale=SCALE, causal=True, causal_form="chunked", chunk_size=c) for c in (1, 16, 64)]
    outs += [linear_attention(q, k, v, scale=SCALE, causal=True, causal_form="loop", chunk_size=1)]  # recurrent decode
    for o in outs:
        assert np.abs(_np(o) - ref).max() / np.abs(ref).max() <= tol


def test_linear_key_padding_equals_truncated():
    q, k, v = _qkv(1, 2, 20, 20, seed=4)
    kp = torch.ones(1, 20, dtype=torch.bool)
    kp[:, 15:] = False
    for causal in (False, True):
        full = linear_attention(q, k, v, scale=SCALE, causal=causal, key_padding=kp)
        trunc = linear_attention(q[:, :, :15], k[:, :, :15], v[:, :, :15], scale=SCALE, causal=causal)
        torch.testing.assert_close(full[:, :, :15], trunc, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- MALA


def test_mala_weights_sum_to_one_and_negative():
    q, k, v = _qkv(1, 1, 30, 30, d=64, dv=8, dtype=torch.float64, seed=7)
    s = 64 ** -0.5
    m = naive_mask(1, 30, 30, False, None)
    w = naive_mala_weights(_np(q), _np(k), m, s, eps=0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert (w < 0).any()
    fast = mala_attention(q, k, v, scale=s, eps=0.0)
    assert np.abs(_np(fast) - w @ _np(v)).max() <= 1e-12


def test_mala_causal_rows_equal_prefix_operator():
    q, k, v = _qkv(1, 2, 12, 12, dtype=torch.float64, seed=8)
    causal = mala_attention(q, k, v, scale=SCALE, causal=True)
    loop = mala_attention(q, k, v, scale=SCALE, causal=True, causal_form="loop", chunk_size=1)
    for i in range(12):
        pre = mala_attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1], scale=SCALE)
        assert torch.allclose(causal[:, :, i], pre[:, :, 0], atol=1e-12)
    assert torch.allclose(causal, loop, atol=1e-12)


# ----------------------------------------------------------------------------------------------- sigmoid


def test_sigmoid_bias_and_zero_logits():
    assert sigmoid_bias(2048) == -math.log(2048)
    assert abs(sigmoid_bias(2048) - (-7.6246)) < 1e-4
    t = 10
    q = torch.zeros(1, 1, 4, 8)
    k = torch.randn(1, 1, t, 8)
    v = torch.eye(t).reshape(1, 1, t, t)  # output row = the weights
    w = sigmoid_attention(q, k, v, scale=SCALE)
    torch.testing.assert_close(w, torch.full_like(w, 1.0 / 2049.0), rtol=1e-6, atol=0)
    w = sigmoid_attention(q, k, v, scale=SCALE, n_ref=100)
    torch.testing.assert_close(w, torch.full_like(w, 1.0 / 101.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sigmoid_masked_weights_exactly_zero(dtype):
    t = 12
    q = (torch.randn(2, 2, t, 8) * 30).to(dtype)  # large logits
    k = (torch.randn(2, 2, t, 8) * 30).to(dtype)
    v = torch.eye(t).expand(2, 2, t, t).to(dtype)
    kp = _kp(2, t)
    w = sigmoid_attention(q, k, v, scale=SCALE, causal=True, key_padding=kp)
    assert torch.isfinite(w).all()
    keep = torch.tensor(naive_mask(2, t, t, True, kp)).expand(2, 2, t, t) > 0
    assert torch.all(w[~keep] == 0)


def test_sigmoid_prefill_equals_decode():
    q, k, v = _qkv(1, 2, 9, 9, seed=9)
    full = sigmoid_attention(q, k, v, scale=SCALE, causal=True)
    last = sigmoid_attention(q[:, :, -1:], k, v, scale=SCALE, causal=True)
    torch.testing.assert_close(full[:, :, -1:], last, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- softplus


def test_lssa_rows_sum_to_one_first_row_and_scale_invariance():
    t = 10
    q, k, _ = _qkv(1, 2, t, t, seed=10)
    eye = torch.eye(t).expand(1, 2, t, t)
    w = softplus_attention(q, k, eye, scale=SCALE, causal=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, t))
    assert torch.all(w[:, :, 0, 0] == 1.0)
    v = torch.randn(1, 2, t, 8)
    a = softplus_attention(q, k, v, scale=SCALE, causal=True)
    b = softplus_attention(q * 3.7, k * 0.2, v, scale=SCALE, causal=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lssar_matches_naive_power_and_rows_sum_to_one():
    for causal in (False, True):
        q, k, _ = _qkv(1, 2, 64, 64, dtype=torch.float64, seed=11)
        eye = torch.eye(64, dtype=torch.float64).expand(1, 2, 64, 64)
        for p in (3.0, 15.0):
            w = softplus_attention(q, k, eye, scale=SCALE, causal=causal, reweight=True, p=p)
            ref = naive_lssar_weights(_np(q), _np(k), naive_mask(1, 64, 64, causal, None), p)
            assert np.abs(_np(w) - ref).max() <= 1e-10
            np.testing.assert_allclose(_np(w).sum(-1), 1.0, atol=1e-12)


def test_lssar_sharpens_towards_argmax():
    q, k, _ = _qkv(1, 1, 16, 16, dtype=torch.float64, seed=12)
    eye = torch.eye(16, dtype=torch.float64).reshape(1, 1, 16, 16)
    w = softplus_attention(q, k, eye, scale=SCALE, reweight=True, p=400.0)
    lssa = softplus_attention(q, k, eye, scale=SCALE)
    onehot = torch.nn.functional.one_hot(lssa.argmax(-1), 16).to(w.dtype)
    assert (w - onehot).abs().max() < 0.05


@pytest.mark.parametrize("n,dtype", [(4096, torch.float16), (4096, torch.float32), (8192, torch.float32)])
def test_lssar_finite_long(n, dtype):
    q, k, v = _qkv(1, 1, n, n, d=16, dv=4, dtype=dtype, seed=13)
    out = softplus_attention(q, k, v, scale=0.25, causal=True, reweight=True, p=15.0)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------- SOFT


def _gram(m, dtype, seed=14):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, 8, generator=g, dtype=torch.float64)
    d2 = ((x[:, :, None] - x[:, None]) ** 2).sum(-1)
    return torch.exp(-0.5 * 0.35 * d2).to(dtype) + 0.01 * torch.eye(m, dtype=dtype)


def test_newton_schulz_matches_pinv():
    p = _gram(64, torch.float64)
    x, res = newton_schulz_inverse(p, 40)
    ref = np.linalg.pinv(_np(p))
    assert np.linalg.norm(_np(x) - ref) / np.linalg.norm(ref) <= 1e-8
    x32, _ = newton_schulz_inverse(p.float(), 40)
    assert np.linalg.norm(_np(x32) - ref) / np.linalg.norm(ref) <= 1e-3
    prev = math.inf
    for it in range(0, 41, 4):  # residual non-increasing
        r = float(newton_schulz_inverse(p, it)[1].max())
        assert r <= prev + 1e-12
        prev = r
    assert prev < 1e-8


def test_soft_landmarks_all_tokens_exact_equals_kernel_attention():
    q, k, v = _qkv(1, 2, 16, 16, dtype=torch.float64, seed=15)
    out = soft_attention(q, k, v, scale=0.35, num_landmarks=16, iterations=200, ridge=0.0)
    ref = naive_gauss(_np(q), _np(k), 0.35) @ _np(v)
    assert np.abs(_np(out) - ref).max() / np.abs(ref).max() <= 1e-8


def test_soft_rejects_masks():
    q, k, v = _qkv(1, 1, 8, 8)
    with pytest.raises(ValueError, match="causal"):
        VARIANTS["soft"].fn(q, k, v, scale=SCALE, causal=True, key_padding=None)
    with pytest.raises(ValueError, match="key_padding"):
        VARIANTS["soft"].fn(q, k, v, scale=SCALE, causal=False, key_padding=torch.ones(1, 8, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- hybrid


def naive_hybrid_causal(q, k, v, w, gamma, scale, eps=1e-6):
    """LoLCATs Eq. 7 with one explicit loop per query (S == T)."""
    b, h, n, _ = q.shape
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    fq, fk = elu1(q), elu1(k)
    for i in range(n):
        win = list(range(max(0, i - w + 1), i + 1)) if w > 0 else []
        rest = list(range(0, max(0, i - w + 1))) if w > 0 else list(range(i + 1))
        num = np.zeros(out.shape[:2] + (v.shape[-1],))
        den = np.zeros(out.shape[:2])
        if win:
            lg = scale * np.einsum("bhd,bhjd->bhj", q[:, :, i], k[:, :, win])
            e = np.exp(lg - lg.max(-1, keepdims=True))
            num += gamma * np.einsum("bhj,bhje->bhe", e, v[:, :, win])
            den += gamma * e.sum(-1)
        if rest:
            a = np.einsum("bhd,bhjd->bhj", fq[:, :, i], fk[:, :, rest])
            num += np.einsum("bhj,bhje->bhe", a, v[:, :, rest])
            den += a.sum(-1)
        out[:, :, i] = num / (den + (0 if win else eps))[..., None]
    return out


def test_hybrid_window_limits_and_naive():
    q, k, v = _qkv(1, 2, 20, 20, dtype=torch.float64, seed=16)
    for causal in (False, True):
        soft = naive_softmax(_np(q), _np(k), _np(v), naive_mask(1, 20, 20, causal, None), SCALE)
        for fn in (linear_attention, mala_attention):
            big = fn(q, k, v, scale=SCALE, causal=causal, window=20)
            assert np.abs(_np(big) - soft).max() <= 1e-10
            assert torch.equal(fn(q, k, v, scale=SCALE, causal=causal, window=0), fn(q, k, v, scale=SCALE, causal=causal))
    ref = naive_hybrid_causal(_np(q), _np(k), _np(v), 5, 1 / (1 + math.exp(2.197)), SCALE)
    got = linear_attention(q, k, v, scale=SCALE, causal=True, window=5)
    assert np.abs(_np(got) - ref).max() <= 1e-10
    gate = {"window_gate": torch.tensor([0.0, 1.0])}
    got = linear_attention(q, k, v, scale=SCALE, causal=True, window=5, params=gate)
    for hd, g in enumerate((0.0, 1.0)):
        ref = naive_hybrid_causal(_np(q)[:, hd:hd + 1], _np(k)[:, hd:hd + 1], _np(v)[:, hd:hd + 1], 5,
                                  1 / (1 + math.exp(-g)), SCALE)
        assert np.abs(_np(got)[:, hd:hd + 1] - ref).max() <= 1e-10


# ----------------------------------------------------------------------------------------------- params


def test_feature_maps():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    y = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    phi = hedgehog(x, init_hedgehog(3, 8))
    assert phi.shape[-1] == 16 and (phi > 0).all()
    t = SCALE * (x * y).sum(-1)
    dot = (taylor2(x, SCALE) * taylor2(y, SCALE)).sum(-1)
    torch.testing.assert_close(dot, 1 + t + t * t / 2)


def test_init_params_and_hedgehog_forward():
    q, k, v = _qkv(1, 2, 10, 10, seed=17)
    for name in ("linear", "mala"):
        var = VARIANTS[name]
        opts = var.resolve_options({"feature_map": "hedgehog", "window": 4})
        p = var.init_params(2, 8, opts)
        assert p["fmap_q"].shape == (2, 8, 8) and p["window_gate"].shape == (2,)
        out = var.fn(q, k, v, scale=SCALE, causal=True, key_padding=None, params=p, **opts)
        assert torch.isfinite(out).all()
        assert var.init_params(2, 8, var.option_defaults()) == {}
    for name in ("sigmoid", "softplus"):
        var = VARIANTS[name]
        p = var.init_params(2, 8, var.option_defaults())
        a = var.fn(q, k, v, scale=SCALE, causal=True, key_padding=None, params=p)
        b = var.fn(q, k, v, scale=SCALE, causal=True, key_padding=None)
        torch.testing.assert_close(a, b)  # init equals the parameter-free form


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fully_masked_rows_are_zero_not_nan(name):
    var = VARIANTS[name]
    q, k, v = _qkv(2, 2, 6, 6, dtype=torch.float16)
    if "key_padding" not in var.mask_kinds:
        pytest.skip("variant takes no padding")
    kp = torch.ones(2, 6, dtype=torch.bool)
    kp[1] = False
    out = var.fn(q, k, v, scale=SCALE, causal=False, key_padding=kp)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)


def test_registry():
    assert set(VARIANTS) == {"reference", "linear", "mala", "sigmoid", "softplus", "soft"}
    with pytest.raises(KeyError, match="known"):
        get_variant("nope")
    assert VARIANTS["soft"].mask_kinds == frozenset({"none"})
