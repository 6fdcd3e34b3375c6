"""Mahalanobis OOD math (passes/ood) against independent references: scikit-learn's EmpiricalCovariance, naive
loops for the metrics, the spec's properties (§9.6): M(μ_c) = 0 is the maximum, invariance under invertible affine
maps, far-OOD samples score higher, singular covariances and D > N do not crash."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance

from passes.ood.detector import MahalanobisDetector, pool_numpy
from passes.ood.ensemble import fit_weights
from passes.ood.gaussian import fit_gaussian, tied_covariance
from passes.ood.metrics import ood_metrics
from rewrite.fit_data import FitDataError


def _clusters(rng, k=4, d=6, n=400, spread=3.0):
    means = rng.normal(size=(k, d)) * spread
    y = np.arange(n) % k
    mix = rng.normal(size=(d, d))
    return means[y] + rng.normal(size=(n, d)) @ mix, y


def test_tied_covariance_equals_sklearn_on_class_centred_features():
    rng = np.random.default_rng(0)
    f, y = _clusters(rng)
    means, cov = tied_covariance(f, y, 4)
    for c in range(4):
        np.testing.assert_allclose(means[c], f[y == c].mean(axis=0), rtol=1e-12)
    centred = f - means[y]
    ref = EmpiricalCovariance().fit(centred).covariance_
    np.testing.assert_allclose(cov, ref, rtol=1e-10, atol=1e-12)
    # the maximum-likelihood /N estimate, not the unbiased /(N-1) one
    assert not np.allclose(cov, np.cov(centred.T), rtol=1e-6)


def test_score_is_zero_at_each_class_mean_and_that_is_its_maximum():
    rng = np.random.default_rng(1)
    f, y = _clusters(rng)
    g = fit_gaussian(f, y, 4, ridge=0)
    np.testing.assert_allclose(g.score(g.means), 0.0, atol=1e-9)
    for c in range(4):
        d2 = g.distances(g.means[c:c + 1])[0]
        assert d2[c] == pytest.approx(0.0, abs=1e-9) and np.all(d2[np.arange(4) != c] > 0)
        nearby = g.means[c] + 0.1 * rng.normal(size=(50, f.shape[1]))
        assert np.all(g.score(nearby) < 0)
    # the score written as the naive quadratic form with scipy's pinvh precision
    x = rng.normal(size=(20, f.shape[1])) * 4
    naive = np.max([-np.einsum("nd,de,ne->n", x - m, g.precision, x - m) for m in g.means], axis=0)
    np.testing.assert_allclose(g.score(x), naive, rtol=1e-9)


def test_score_is_invariant_under_invertible_affine_maps():
    rng = np.random.default_rng(2)
    f, y = _clusters(rng)
    a = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    b = rng.normal(size=6) * 10
    probe = rng.normal(size=(30, 6)) * 5
    plain = fit_gaussian(f, y, 4, ridge=0).score(probe)
    mapped = fit_gaussian(f @ a + b, y, 4, ridge=0).score(probe @ a + b)
    np.testing.assert_allclose(mapped, plain, rtol=1e-7)
    # and the ensemble score built on several layers is invariant too
    layers = [fit_gaussian(f, y, 4, ridge=0), fit_gaussian(f[:, :3], y, 4, ridge=0)]
    layers_m = [fit_gaussian(f @ a + b, y, 4, ridge=0), fit_gaussian(f[:, :3] * 7 - 1, y, 4, ridge=0)]
    s = np.stack([layers[0].score(f), layers[1].score(f[:, :3])], 1)
    s_m = np.stack([layers_m[0].score(f @ a + b), layers_m[1].score(f[:, :3] * 7 - 1)], 1)
    np.testing.assert_allclose(fit_weights(s_m).ood_score(s_m), fit_weights(s).ood_score(s), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("with_ood", [False, True])
def test_far_ood_samples_score_higher_than_held_out_in_distribution(with_ood):
    rng = np.random.default_rng(3)
    f, y = _clusters(rng, n=800)
    fit_f, fit_y, held = f[:600], y[:600], f[600:]
    far = rng.normal(size=(200, 6)) * 3 + 40.0
    layers = [fit_gaussian(fit_f, fit_y, 4), fit_gaussian(np.tanh(fit_f / 5), fit_y, 4)]

    def scores(x):
        return np.stack([layers[0].score(x), layers[1].score(np.tanh(x / 5))], 1)
    weights = fit_weights(scores(held[:100]), scores(far[:100]) if with_ood else None)
    assert weights.method == ("logistic" if with_ood else "equal")
    s_in, s_out = weights.ood_score(scores(held[100:])), weights.ood_score(scores(far[100:]))
    assert s_out.min() > s_in.max()  # higher = more likely out-of-distribution
    assert ood_metrics(s_in, s_out)["auroc"] == 1.0


def test_equal_weights_are_the_mean_of_z_scored_layer_scores():
    rng = np.random.default_rng(4)
    s_val = rng.normal(size=(50, 3)) * [1.0, 10.0, 0.1] + [5.0, -3.0, 2.0]
    w = fit_weights(s_val)
    probe = rng.normal(size=(7, 3))
    z = (probe - s_val.mean(0)) / s_val.std(0)
    np.testing.assert_allclose(w.ood_score(probe), -z.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(w.beta, 1 / 3)


def test_logistic_regression_ensemble_matches_sklearn_probability_and_does_not_warn():
    from sklearn.linear_model import LogisticRegressionCV
    rng = np.random.default_rng(5)
    s_in, s_out = rng.normal(size=(80, 3)), rng.normal(size=(80, 3)) - [1.5, 0.2, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        w = fit_weights(s_in, s_out)
    mean, std = s_in.mean(0), s_in.std(0)
    z = (np.concatenate([s_in, s_out]) - mean) / std
    ref = LogisticRegressionCV(Cs=10, l1_ratios=(0.0,), scoring="neg_log_loss", cv=5, max_iter=2000,
                               random_state=0, use_legacy_attributes=False).fit(
        z, np.r_[np.ones(80), np.zeros(80)])
    probe = rng.normal(size=(10, 3))
    p_in = ref.predict_proba((probe - mean) / std)[:, list(ref.classes_).index(1.0)]
    np.testing.assert_allclose(w.ood_score(probe), -np.log(p_in / (1 - p_in)), rtol=1e-6, atol=1e-8)


def test_singular_covariance_uses_the_pseudo_inverse():
    rng = np.random.default_rng(6)
    f, y = _clusters(rng)
    dup = np.concatenate([f, f[:, :1], np.zeros((len(f), 2))], axis=1)  # a copied column and dead ReLU units
    g, g_dup = fit_gaussian(f, y, 4, ridge=0), fit_gaussian(dup, y, 4, ridge=0)
    assert np.linalg.matrix_rank(g_dup.covariance) == 6
    probe = rng.normal(size=(25, 6)) * 4
    probe_dup = np.concatenate([probe, probe[:, :1], np.zeros((25, 2))], axis=1)
    np.testing.assert_allclose(g_dup.score(probe_dup), g.score(probe), rtol=1e-6)


def test_more_features_than_samples_does_not_crash_and_ranks_sensibly():
    rng = np.random.default_rng(7)
    f = rng.normal(size=(12, 50))
    y = np.arange(12) % 3
    g = fit_gaussian(f, y, 3)  # auto: D > N_c, so a ridge relative to the trace
    assert g.ridge > 0
    s_train, s_far = g.score(f), g.score(f + 25.0)
    assert np.all(np.isfinite(s_train)) and np.all(np.isfinite(s_far))
    assert s_far.max() < s_train.min()
    g0 = fit_gaussian(f, y, 3, ridge=0)  # rank-deficient, no ridge: pinvh still gives finite scores
    assert np.all(np.isfinite(g0.score(f + 25.0)))


def test_a_class_without_samples_is_an_error_naming_it():
    f = np.random.default_rng(8).normal(size=(9, 4))
    with pytest.raises(FitDataError, match=r"classes \[2\] have no samples"):
        tied_covariance(f, np.array([0, 1, 3] * 3), 4)


def test_metrics_against_naive_loops():
    rng = np.random.default_rng(9)
    s_in, s_out = rng.normal(size=300), rng.normal(size=200) + 1.2
    m = ood_metrics(s_in, s_out)
    pairs = (s_out[:, None] > s_in[None, :]).mean() + 0.5 * (s_out[:, None] == s_in[None, :]).mean()
    assert m["auroc"] == pytest.approx(pairs, abs=1e-12)
    best_tnr, best_acc = 0.0, 0.0
    for t in np.concatenate([s_in, s_out, [np.inf, -np.inf]]):  # "in" when score <= t
        tpr, tnr = (s_in <= t).mean(), (s_out > t).mean()
        if tpr >= 0.95:
            best_tnr = max(best_tnr, tnr)
        best_acc = max(best_acc, 0.5 * (tpr + tnr))
    assert m["tnr_at_tpr95"] == pytest.approx(best_tnr, abs=1e-12)
    assert m["detection_accuracy"] == pytest.approx(best_acc, abs=1e-12)
    # AUPR-out: the mean precision at each OOD sample when ranked by decreasing score
    ranked = np.argsort(-np.concatenate([s_in, s_out]), kind="stable")
    is_out = np.r_[np.zeros(300), np.ones(200)][ranked]
    precision_at_hits = np.cumsum(is_out)[is_out == 1] / (np.flatnonzero(is_out) + 1)
    assert m["aupr_out"] == pytest.approx(precision_at_hits.mean(), abs=1e-9)
    assert 0.5 < m["aupr_in"] <= 1.0


@pytest.mark.parametrize("pool,shape", [("spatial_mean", (5, 3, 4, 4)), ("token_mean", (5, 7, 3)),
                                        ("cls", (5, 7, 3)), ("none", (5, 3))])
def test_scoring_module_equals_the_numpy_detector(pool, shape):
    rng = np.random.default_rng(10)
    fit_x = rng.normal(size=(60, *shape[1:])).astype(np.float32)
    y = np.arange(60) % 3
    second = rng.normal(size=(60, 4)).astype(np.float32)
    layers = [fit_gaussian(pool_numpy(fit_x, pool), y, 3), fit_gaussian(second, y, 3)]
    det = MahalanobisDetector(taps=["a", "b"], pools=[pool, "none"], layers=layers, weights=None)
    det.weights = fit_weights(det.layer_scores([fit_x, second]))
    probe = [rng.normal(size=shape).astype(np.float32) * 2, rng.normal(size=(5, 4)).astype(np.float32)]
    with torch.no_grad():
        got = det.module()(*[torch.from_numpy(p) for p in probe])
    assert got.shape == (5,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), det.ood_score(probe), rtol=1e-6, atol=1e-6)
