"""The head catalogue's math against independent references: spec §9.1–3 properties, scikit-learn's LinearSVC, a
complex-arithmetic Fourier head written here, and naive loss formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from passes.heads import fourier, losses
from passes.heads.errors import ClassOrderError, HeadShapeError
from passes.heads.svm import SVMHead, fit_linear_svc, fold_scaler, svm_predict
from passes.heads.zloss import ZLossHead, confidence, zscore


# ---------------------------------------------------------------------------------------------------- SVM (§9.1)
def test_all_negative_margins_pick_the_largest_not_index_0():
    margins = torch.tensor([[-3.0, -0.2, -1.5, -0.9], [-0.1, -5.0, -2.0, -0.3]])
    assert svm_predict(margins).tolist() == [1, 0]
    naive = torch.sign(margins).argmax(-1)  # the official repos' argmax(sign(o)): every row ties at -1 -> index 0
    assert naive.tolist() == [0, 0]
    # several positive margins: the largest wins, not the first positive one
    assert svm_predict(torch.tensor([[0.5, 2.0, 1.0]])).tolist() == [1]


def _blobs(n=300, d=6, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (k, d))
    y = np.arange(n) % k
    x = centres[y] + rng.normal(0, 1.5, (n, d)) * rng.uniform(0.5, 20, d)  # unequal feature scales
    return x, y


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("k", [2, 4])
def test_posthoc_margins_equal_linearsvc(standardize, k):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    x, y = _blobs(k=k)
    fit = fit_linear_svc(x, y, k, standardize=standardize, max_iter=20000, tol=1e-8)
    ref = LinearSVC(max_iter=20000, tol=1e-8, random_state=0)
    ref = make_pipeline(StandardScaler(), ref) if standardize else ref
    ref.fit(x, y)
    head = SVMHead(fit.weight, fit.bias).double()
    margins = head(torch.from_numpy(x)).detach().numpy()
    decision = ref.decision_function(x)
    if k == 2:  # one row (positive = class 1) mapped to the margins (−s, +s)
        np.testing.assert_allclose(margins[:, 1], decision, atol=1e-6)
        np.testing.assert_allclose(margins[:, 0], -decision, atol=1e-6)
    else:
        np.testing.assert_allclose(margins, decision, atol=1e-6)
    assert (head.predict(torch.from_numpy(x)).numpy() == ref.predict(x)).all()
    assert fit.standardized == standardize and fit.converged


def test_fold_scaler_matches_scaling_the_features():
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    mu, sd = rng.normal(size=5), rng.uniform(0.1, 4, 5)
    f = rng.normal(size=(7, 5))
    w2, b2 = fold_scaler(w, b, mu, sd)
    np.testing.assert_allclose(f @ w2.T + b2, ((f - mu) / sd) @ w.T + b, atol=1e-12)


def test_linearsvc_non_convergence_is_surfaced(caplog):
    x, y = _blobs(n=200, k=3)
    with caplog.at_level("WARNING"):
        fit = fit_linear_svc(x * 1000, y, 3, max_iter=2)
    assert not fit.converged and "did not converge" in caplog.text


def test_squared_hinge_against_the_naive_formula_and_presets():
    torch.manual_seed(0)
    s, y, w = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0]), torch.randn(4, 5,
                                                                                                   dtype=torch.float64)
    t = -np.ones((6, 4))
    t[np.arange(6), y.numpy()] = 1
    hinge = np.maximum(0, 1 - t * s.numpy()) ** 2
    ww = (w.numpy() ** 2).sum()
    assert losses.squared_hinge(s, y, w, C=2.0, lam=0.5).item() == pytest.approx(0.25 * ww + 2.0 * hinge.mean())
    assert losses.squared_hinge(s, y, w, preset="agarap").item() == pytest.approx((w.numpy() ** 2).mean()
                                                                                  + hinge.mean())
    assert losses.squared_hinge(s, y, w, C=0.5, preset="tang").item() == pytest.approx(0.5 * ww + 0.5 * hinge.sum())
    # gradient w.r.t. the margin: −2C t max(0, 1 − t s) (mean reduction divides by N·K)
    s2 = s.clone().requires_grad_(True)
    losses.squared_hinge(s2, y, C=3.0).backward()
    np.testing.assert_allclose(s2.grad.numpy(), -2 * 3.0 * t * np.maximum(0, 1 - t * s.numpy()) / 24, atol=1e-12)


# -------------------------------------------------------------------------------------------------- Z-loss (§9.2)
logit_rows = st.lists(st.floats(-30, 30, allow_nan=False, allow_subnormal=False), min_size=3, max_size=12).filter(
    lambda r: max(r) - min(r) > 1e-3 and sorted(r)[-1] - sorted(r)[-2] > 1e-9)  # a unique argmax


@settings(max_examples=60, deadline=None)
@given(row=logit_rows, alpha=st.floats(0.01, 50), beta=st.floats(-100, 100), a=st.sampled_from([0.1, 1.0, 10.0]),
       b=st.floats(0, 1.5))
def test_zloss_is_shift_and_scale_invariant(row, alpha, beta, a, b):
    o = torch.tensor([row], dtype=torch.float64)
    y = torch.tensor([len(row) // 2])
    base = losses.zloss(o, y, a, b)
    assert losses.zloss(alpha * o + beta, y, a, b).item() == pytest.approx(base.item(), abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(row=logit_rows)
def test_z_keeps_the_argmax_and_is_bounded(row):
    o = torch.tensor([row], dtype=torch.float64)
    z = zscore(o)
    k = len(row)
    assert int(z.argmax()) == int(o.argmax())
    assert float(z.max()) <= math.sqrt(k - 1) + 1e-9
    # population std: np.std (ddof=0), not torch.std's unbiased default
    np.testing.assert_allclose(z.numpy()[0], (np.array(row) - np.mean(row)) / (np.std(row) + 1e-12), atol=1e-9)


def test_zloss_a1_b0_is_softplus_of_minus_z_y():
    torch.manual_seed(0)
    o, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    z = zscore(o)
    np.testing.assert_allclose(losses.zloss(o, y, reduction="none").numpy(),
                               np.log1p(np.exp(-z[torch.arange(8), y].numpy())), atol=1e-12)


def test_zloss_rejects_two_classes_and_guards_equal_logits():
    with pytest.raises(HeadShapeError, match="K = 2"):
        losses.zloss(torch.randn(3, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(HeadShapeError, match="K = 2"):
        ZLossHead(torch.zeros(2, 4), torch.zeros(2))
    z = zscore(torch.zeros(2, 5))  # σ = 0: the ε guard keeps it finite
    assert torch.isfinite(z).all() and (z == 0).all()
    head = ZLossHead(torch.randn(4, 3), torch.randn(4), a=2.0, b=0.5, extras=True)
    f = torch.randn(5, 3)
    o, zz, conf = head(f)
    np.testing.assert_allclose(conf.detach().numpy(), 1 / (1 + np.exp(-2.0 * (zz.detach().numpy() - 0.5))), atol=1e-6)
    assert torch.equal(confidence(zz, 2.0, 0.5), conf)


# ------------------------------------------------------------------------------------------------- Fourier (§9.3)
def complex_reference(params: torch.Tensor, n_freq: int, m: int, x: torch.Tensor, eps: float = 1e-5):
    """The 7 steps of the spec in complex arithmetic (written here, independent of the real-valued module)."""
    c = torch.complex(params[:, :n_freq + 1], params[:, n_freq + 1:])
    a = torch.stack([(c[:, k:] * c[:, :n_freq + 1 - k].conj()).sum(-1) for k in range(n_freq + 1)], dim=-1)
    at = a[:, 1:] / a[:, :1].real
    k = torch.arange(1, n_freq + 1, dtype=torch.float64)
    pdf = 0.5 + (at[:, :, None] * torch.exp(1j * math.pi * k[None, :, None] * x[None, None, :])).sum(1).real
    centres = -1 + (2 * torch.arange(m, dtype=torch.float64) + 1) / m
    pc = 0.5 + (at[:, :, None] * torch.exp(1j * math.pi * k[None, :, None] * centres[None, None, :])).sum(1).real
    q = pc / pc.sum(-1, keepdim=True)
    reg = 2 * (2 * math.pi ** 2 * torch.arange(n_freq + 1, dtype=torch.float64) ** 2 * a.abs() ** 2).sum(-1).mean()
    return pdf, torch.log(q + eps), reg


@pytest.mark.parametrize("m, n_freq", [(10, 3), (12, 5), (50, 20), (8, 11)])
def test_fourier_real_form_equals_complex_form(m, n_freq):
    torch.manual_seed(m + n_freq)
    head = fourier.FourierHead(7, m, n_freq, gamma=1.0, init_w_div=1, init_b_div=1).double()
    f = torch.randn(5, 7, dtype=torch.float64)
    x = torch.linspace(-1, 1, 301, dtype=torch.float64)
    pdf_ref, logits_ref, reg_ref = complex_reference(head.linear(f), n_freq, m, x)
    np.testing.assert_allclose(head.pdf(f, x).detach().numpy(), pdf_ref.detach().numpy(), atol=1e-6)
    logits, reg = head.logits_and_reg(f)
    np.testing.assert_allclose(logits.detach().numpy(), logits_ref.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(head(f).detach().numpy(), logits_ref.detach().numpy(), atol=1e-6)
    assert reg.item() == pytest.approx(reg_ref.item(), rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(4, 40), n_freq=st.integers(1, 16))
def test_fourier_pdf_is_a_density(seed, m, n_freq):
    torch.manual_seed(seed)
    head = fourier.FourierHead(4, m, n_freq, init_w_div=1, init_b_div=1).double()
    f = torch.randn(3, 4, dtype=torch.float64)
    x = torch.linspace(-1, 1, 8001, dtype=torch.float64)
    with torch.no_grad():
        p = head.pdf(f, x)
        assert float(p.min()) >= -1e-12  # Fejér–Riesz: p = |Σ c_j e^{iπjx}|² / (2 a_0)
        # ∫ p = 1: the trapezoid rule on a periodic trigonometric polynomial is exact with > N points
        integral = torch.trapezoid(p, x, dim=-1)
        np.testing.assert_allclose(integral.numpy(), 1.0, atol=1e-6)
        if n_freq < m:  # midpoint rule exact for degree < m: Σ_j p(x_j) = m/2
            np.testing.assert_allclose(head.pdf(f, fourier.bin_centres(m)).sum(-1).numpy(), m / 2, atol=1e-9)
        # softmax(logits) = (q + ε)/(1 + mε)
        q = head.bin_probs(f)
        np.testing.assert_allclose(F.softmax(head(f), -1).numpy(), ((q + 1e-5) / (1 + m * 1e-5)).numpy(),
                                   atol=1e-12)


def test_fourier_guard_class_order_and_regularizer_in_the_loss():
    head = fourier.FourierHead(3, 6, 2)
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.zero_()
    q = head.bin_probs(torch.randn(2, 3))  # all-zero c: Re a0 = 0 guarded, uniform density
    assert torch.isfinite(q).all() and torch.allclose(q, torch.full_like(q, 1 / 6))
    with pytest.raises(ClassOrderError, match="not a permutation"):
        fourier.FourierHead(3, 4, 2, class_order=[0, 1, 1, 3])
    ordered = fourier.FourierHead(3, 4, 2, class_order=[2, 0, 3, 1]).double()
    f = torch.randn(5, 3, dtype=torch.float64)
    bins = torch.log(ordered.bin_probs(f) + 1e-5)
    assert torch.equal(ordered(f), bins[:, [2, 0, 3, 1]])  # class c reads bin class_order[c]
    y = torch.tensor([0, 1, 2, 3, 0])
    logits, reg = ordered.logits_and_reg(f)
    assert reg.item() > 0
    assert losses.fourier_loss(ordered, f, y).item() == pytest.approx(F.cross_entropy(logits, y).item() + reg.item())


def test_smoothness_metric_matches_scipy():
    from scipy.ndimage import gaussian_filter1d
    rng = np.random.default_rng(0)
    p = rng.random((2, 50))
    ref = sum(6 / (math.pi ** 2 * s ** 2) * np.linalg.norm(p - gaussian_filter1d(p, s, axis=-1, mode="wrap"),
                                                            axis=-1) for s in range(1, 101))
    np.testing.assert_allclose(fourier.smoothness(p), ref, rtol=1e-9)
    assert fourier.smoothness(np.full((1, 50), 0.02))[0] == pytest.approx(0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ training loop
def test_training_is_seeded_and_honours_the_step_and_time_budgets():
    from passes.heads.training import train_head
    torch.manual_seed(0)
    f, y = torch.randn(200, 6, dtype=torch.float64), torch.randint(0, 4, (200,))

    def run(steps, minutes=None):
        torch.manual_seed(1)
        head = ZLossHead(torch.randn(4, 6), torch.zeros(4)).double()
        log = train_head(head, lambda m, fb, yb: losses.zloss(m(fb), yb), f, y, steps=steps, lr=1e-2, batch=32,
                         seed=3, minutes=minutes)
        return head, log

    a, log_a = run(25)
    b, _ = run(25)
    assert log_a.steps == 25 and log_a.stopped_by == "steps" and torch.equal(a.weight, b.weight)
    _, log_t = run(10 ** 9, minutes=0.5 / 60)  # half a second
    assert log_t.stopped_by == "time" and 0 < log_t.steps < 10 ** 9 and log_t.seconds < 5
