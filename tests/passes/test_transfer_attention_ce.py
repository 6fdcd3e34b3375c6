"""The attention-weight cross-entropy term of stage 1 (passes/transfer/attention_ce.py, ``attention_ce=``).

Independent reference: the student's attention map written out with numpy from the Hedgehog formula
(φ(x) = [softmax(xW) ⊕ softmax(−xW)], weights φ(q)·φ(k) over kept keys, row-normalised) and the teacher's softmax
map, the cross-entropy averaged over real query rows by hand. Then: the option changes the fitting loss by exactly
λ·CE, changes the fitted params, and stays deterministic per seed; the CLI flags reach the report.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path as _Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from passes.attention import get_variant  # noqa: E402
from passes.transfer import fit_params  # noqa: E402
from passes.transfer.attention_ce import attention_ce  # noqa: E402
from passes.transfer.fit import FitConfig, site_loss  # noqa: E402
from rewrite.binding import SiteModule, SiteSpec  # noqa: E402
sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
from transfer_models import tiny_bert  # noqa: E402

B, H, N, D = 2, 3, 7, 4
SCALE = 0.5


def _site() -> tuple[SiteModule, list[torch.Tensor], np.ndarray]:
    """A key-padded linear (Hedgehog) site with random maps, one sample, and its keep mask (B, N)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = np.ones((B, N), dtype=bool)
    keep[1, 5:] = False
    mask = torch.from_numpy(np.where(keep, 0.0, np.finfo(np.float64).min))[:, None, None, :]
    spec = SiteSpec(scale=SCALE, causal=False, mask="key_padding", layout="BHSD", heads=H, k_transposed=False,
                    term_modes=("add",))
    params = {"fmap_q": torch.randn(H, D, D, generator=gen, dtype=torch.float64),
              "fmap_k": torch.randn(H, D, D, generator=gen, dtype=torch.float64)}
    module = SiteModule(get_variant("linear"), spec, {"feature_map": "hedgehog"}, params)
    target = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    return module, [q, k, v, mask, target], keep


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _naive_ce(module: SiteModule, sample: list[torch.Tensor], keep: np.ndarray) -> float:
    q, k = sample[0].numpy(), sample[1].numpy()
    wq, wk = module.params["fmap_q"].detach().numpy(), module.params["fmap_k"].detach().numpy()
    total, rows = 0.0, 0
    for b in range(B):
        for h in range(H):
            def phi(x: np.ndarray, w: np.ndarray) -> np.ndarray:
                y = x @ w
                return np.concatenate([_softmax(y), _softmax(-y)], -1)
            kept = keep[b]
            fq, fk = phi(q[b, h], wq[h]), phi(k[b, h][kept], wk[h])
            student = fq @ fk.T
            student /= student.sum(-1, keepdims=True)
            teacher = _softmax(SCALE * q[b, h] @ k[b, h][kept].T)
            for i in range(N):
                if keep[b, i]:
                    total += -(teacher[i] * np.log(student[i])).sum()
                    rows += 1
    return total / rows


def test_attention_ce_equals_naive_formula() -> None:
    module, sample, keep = _site()
    got = float(attention_ce(module, sample).detach())
    assert got == pytest.approx(_naive_ce(module, sample, keep), rel=1e-5)
    # the cross-entropy is at least the teacher's entropy (equality only if the maps agree)
    assert got > 0


def test_site_loss_adds_lambda_times_ce_and_has_gradients() -> None:
    module, sample, _ = _site()
    plain = site_loss(module, sample, FitConfig())
    with_ce = site_loss(module, sample, FitConfig(lambda_ce=2.5))
    # (the loss is computed in float32, and the MSE term is ~1e3 here: float32 steps there are ~6e-5)
    assert float((with_ce - plain).detach()) == pytest.approx(2.5 * float(attention_ce(module, sample).detach()), abs=5e-4)
    module.zero_grad()
    attention_ce(module, sample).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.params.values())


@pytest.fixture(scope="module")
def tiny():
    return tiny_bert()


def _fit(model, ce: float, seed: int = 0) -> tuple[dict, dict]:
    _, _, params, report = fit_params(model, attention="linear", steps=8, batch_size=4, progress=False, seed=seed,
                                      attention_ce=ce)
    return params, report


def test_attention_ce_option_changes_fit_and_is_deterministic(tiny) -> None:
    a, rep = _fit(tiny, 1.0)
    b, _ = _fit(tiny, 1.0)
    c, _ = _fit(tiny, 0.0)
    assert rep["attention_ce"] == 1.0
    for site in a:
        for name in a[site]:
            assert torch.equal(a[site][name], b[site][name]), (site, name)
    assert any(not torch.equal(a[s][n], c[s][n]) for s in a for n in a[s])


def test_cli_flags_reach_the_report(tiny, tmp_path) -> None:
    from rewrite.api import export
    from rewrite.cli import main
    src = tmp_path / "tiny.pt2"
    export(tiny, src)
    report = tmp_path / "r.json"
    rc = main(["transfer", str(src), "-o", str(tmp_path / "out.pt2"), "--attention", "linear", "--steps", "2",
               "--batch-size", "4", "--attention-ce", "0.5", "--stage2-steps", "2", "--stage2-rank", "2",
               "--report", str(report), "--no-progress"])
    assert rc == 0
    data = json.loads(report.read_text())
    assert data["attention_ce"] == 0.5
    assert data["stage2"]["steps"] == 2 and data["stage2"]["rank"] == 2
    assert main(["transfer", str(src), "-o", str(tmp_path / "bad.pt2"), "--attention", "linear",
                 "--attention-ce", "-1"]) == 2
    assert not (tmp_path / "bad.pt2").exists()
