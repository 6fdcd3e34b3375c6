"""Data parallelism inside one site's fit (passes/transfer/site_dp.py), for more ranks than sites.

References: the whole sample's loss and gradient in one process (the members' row-slice losses, normalised by the
whole sample's counts, must add up to them — MSE and the attention-CE term, with key padding); a hand partition of
ranks over sites; and end to end, the same transfer in one process (4 gloo ranks on a 2-site model: every site
fitted by two ranks, params within 1e-5 of one process, every rank busy).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from passes.attention import get_variant  # noqa: E402
from passes.transfer import load_checkpoint_params  # noqa: E402
from passes.transfer.fit import FitConfig, site_loss  # noqa: E402
from passes.transfer.site_dp import WHOLE, site_groups, split_rows, take_rows  # noqa: E402
from rewrite.binding import SiteModule, SiteSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transfer_models import tiny_bert_onnx_with_calibration  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
B, H, N, D = 5, 3, 7, 4


def _site() -> tuple[SiteModule, list[torch.Tensor]]:
    """A key-padded linear (Hedgehog) site with random maps and one sample of B = 5 rows."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = np.ones((B, N), dtype=bool)
    keep[1, 5:] = False
    keep[4, 2:] = False
    mask = torch.from_numpy(np.where(keep, 0.0, np.finfo(np.float64).min))[:, None, None, :]
    spec = SiteSpec(scale=0.5, causal=False, mask="key_padding", layout="BHSD", heads=H, k_transposed=False,
                    term_modes=("add",))
    params = {"fmap_q": torch.randn(H, D, D, generator=gen, dtype=torch.float64, requires_grad=True),
              "fmap_k": torch.randn(H, D, D, generator=gen, dtype=torch.float64, requires_grad=True)}
    module = SiteModule(get_variant("linear"), spec, {"feature_map": "hedgehog"}, params)
    target = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    return module, [q, k, v, mask, target]


def _loss_and_grads(module: SiteModule, sample: list[torch.Tensor], config: FitConfig,
                    rows: slice | None) -> tuple[float, list[torch.Tensor]]:
    for p in module.params.values():
        p.grad = None
    loss = site_loss(module, sample, config, rows=rows)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in module.params.values()]


@pytest.mark.parametrize("members", [2, 3, 5, 7])
@pytest.mark.parametrize("lambda_ce", [0.0, 0.3])
def test_row_slices_add_up_to_the_whole_sample(members: int, lambda_ce: float) -> None:
    module, sample = _site()
    config = FitConfig(lambda_ce=lambda_ce)
    whole, whole_grads = _loss_and_grads(module, sample, config, None)
    total, grads = 0.0, [torch.zeros_like(g) for g in whole_grads]
    covered = []
    for member in range(members):
        rows = split_rows(sample, member, members)
        if rows is None:  # 7 members, 5 rows: two members get none
            continue
        covered += list(range(B))[rows]
        loss, g = _loss_and_grads(module, sample, config, rows)
        total += loss
        grads = [a + b for a, b in zip(grads, g)]
    assert covered == list(range(B))  # every row once, in order
    assert total == pytest.approx(whole, rel=1e-6)  # site_loss computes in float32
    for a, b in zip(grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_split_rows_keeps_broadcast_values_and_refuses_merged_heads() -> None:
    _, sample = _site()
    broadcast = [sample[0], sample[1], sample[2], sample[3][:1], sample[4]]  # a (1, 1, 1, N) mask
    part = take_rows(broadcast, split_rows(broadcast, 1, 2))
    assert [t.shape[0] for t in part] == [2, 2, 2, 1, 2]
    merged = [t.reshape(B * H, N, D) for t in (sample[0], sample[1], sample[2])] + [sample[4].reshape(B * H, N, D)]
    assert split_rows(merged, 0, 2) is WHOLE and split_rows(merged, 1, 2) is None
    odd = [sample[0], sample[1][:3]]  # leading sizes that disagree
    assert split_rows(odd, 0, 2) is WHOLE and split_rows(odd, 1, 2) is None


def test_site_groups_cover_every_rank_once() -> None:
    assert site_groups(["a", "b", "c"], 3) == {} and site_groups(["a"], 1) == {}
    assert site_groups(["a", "b"], 4) == {"a": [0, 2], "b": [1, 3]}
    for n_sites, world in ((1, 2), (2, 5), (3, 8), (6, 16)):
        groups = site_groups([f"s{i}" for i in range(n_sites)], world)
        ranks = sorted(r for rs in groups.values() for r in rs)
        assert ranks == list(range(world))
        sizes = [len(rs) for rs in groups.values()]
        assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_bert_onnx_with_calibration(tmp_path_factory.mktemp("sitedp"))


def _run(model: Path, data: Path, out: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "rewrite.cli", "transfer", str(model), "-o", str(out.with_suffix(".onnx")),
           "--data", str(data), "--attention", "linear", "--batch-size", "5", "--steps", "10", "--seed", "4",
           "--no-progress", "--checkpoint", str(out.with_suffix(".pt")), "--report", str(out.with_suffix(".json")),
           *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_four_ranks_on_two_sites_fit_each_site_together(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    one = _run(*model_and_data, tmp_path / "one", [])
    assert one.returncode == 0, one.stderr[-2000:]
    four = _run(*model_and_data, tmp_path / "four", ["--nproc", "4"])
    assert four.returncode == 0, four.stderr[-2000:]
    r1 = json.loads((tmp_path / "one.json").read_text())
    r4 = json.loads((tmp_path / "four.json").read_text())
    assert r4["distributed"]["data_parallel_sites"] == {"attn0": [0, 2], "attn1": [1, 3]}
    assert r4["distributed"]["assignment"] == {"0": ["attn0"], "1": ["attn1"], "2": ["attn0"], "3": ["attn1"]}
    p1 = load_checkpoint_params(tmp_path / "one.pt")
    p4 = load_checkpoint_params(tmp_path / "four.pt")
    assert set(p1) == set(p4) == {"attn0", "attn1"}
    for site in p1:
        for k in p1[site]:
            torch.testing.assert_close(p4[site][k], p1[site][k], rtol=1e-5, atol=1e-5)
    for site, row in r1["sites"].items():
        assert r4["sites"][site]["steps"] == row["steps"] == 10
        assert r4["sites"][site]["after"]["cosine"] == pytest.approx(row["after"]["cosine"], abs=1e-5)
        assert r4["sites"][site]["losses"] == pytest.approx(row["losses"], rel=1e-4)
