"""Data-parallel LoLCATs stage 2 (passes/transfer/stage2_dp.py) over gloo ranks on 127.0.0.1.

References: numpy's masked mean squared error of the whole batch (the ranks' scaled slice losses must add up to
it), and the same transfer in one process (2 ranks must give the same stage-2 weights within 1e-5, the same stage-1
params within 1e-6, and the same stage-2 losses).
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

from passes.transfer import load_checkpoint_params  # noqa: E402
from passes.transfer.stage2 import _loss  # noqa: E402
from passes.transfer.stage2_dp import RowSplit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transfer_models import tiny_bert  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# batch size 5 on 16 training samples: batches of 5, 5, 5 and 1 rows (uneven slices; rank 1 has no row of the last)
ARGS = ["--attention", "linear", "--batch-size", "5", "--steps", "6", "--seed", "2", "--stage2-steps", "12",
        "--stage2-rank", "2", "--stage2-lr", "5e-3", "--no-progress"]


def _numpy_loss(out: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    m = mask[..., None].astype(np.float64)
    return float((((out.astype(np.float64) - ref) ** 2) * m).sum() / (m.sum() * out.shape[-1]))


@pytest.mark.parametrize("world", [2, 3, 7])
def test_slice_losses_add_up_to_the_batch_loss(world: int) -> None:
    rng = np.random.default_rng(world)
    rows, tokens, dim = 5, 9, 4
    mask = (np.arange(tokens)[None, :] < rng.integers(1, tokens + 1, size=rows)[:, None]).astype(np.int64)
    batch = {"input_ids": rng.integers(0, 100, size=(rows, tokens)), "attention_mask": mask}
    out = rng.standard_normal((rows, tokens, dim)).astype(np.float32)
    ref = rng.standard_normal((rows, tokens, dim)).astype(np.float32)
    total, seen = 0.0, []
    for rank in range(world):
        mine, share = RowSplit(rank=rank, world=world).local(batch)
        if mine is None:
            assert share == 0.0
            continue
        lo = sum(len(x) for x in seen)
        seen.append(mine["input_ids"])
        n = len(mine["input_ids"])
        np.testing.assert_array_equal(mine["attention_mask"], mask[lo:lo + n])
        total += float(_loss(torch.from_numpy(out[lo:lo + n]), torch.from_numpy(ref[lo:lo + n]), mine)) * share
    np.testing.assert_array_equal(np.concatenate(seen), batch["input_ids"])  # every row once, in order
    assert total == pytest.approx(_numpy_loss(out, ref, mask), rel=1e-6)
    whole, share = RowSplit().local(batch)
    assert whole is batch and share == 1.0


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dp")
    fx = tiny_bert()
    torch.export.save(fx.ep, folder / "tiny.pt2")
    feeds = {k: v.numpy() for k, v in fx.extra["hf"].make_inputs(20, 12, seed=7).items()}
    np.savez(folder / "cal.npz", **feeds)
    return folder / "tiny.pt2", folder / "cal.npz"


def _run(model: Path, data: Path, out: Path, tag: str, extra: list[str] = ()) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rewrite.cli", "transfer", str(model), "-o", str(out / f"{tag}.pt2"),
                           "--data", str(data), *ARGS, "--checkpoint", str(out / f"{tag}.pt"),
                           "--report", str(out / f"{tag}.json"), *extra],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_two_ranks_stage2_equals_one_rank(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    for tag, extra in (("r1", []), ("r2", ["--nproc", "2"])):
        proc = _run(*model_and_data, tmp_path, tag, extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    r1 = json.loads((tmp_path / "r1.json").read_text())
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert r1["stage2"]["steps"] == r2["stage2"]["steps"] == 12
    assert r2["stage2"]["data_parallel_ranks"] == 2 and "data_parallel_ranks" not in r1["stage2"]
    assert r2["stage2"]["loss_first"] == pytest.approx(r1["stage2"]["loss_first"], rel=1e-5)
    assert r2["stage2"]["loss_last"] == pytest.approx(r1["stage2"]["loss_last"], rel=1e-5)
    # stage 1: the same site params (rank-independent fits)
    p1, p2 = load_checkpoint_params(tmp_path / "r1.pt"), load_checkpoint_params(tmp_path / "r2.pt")
    for site in p1:
        for k in p1[site]:
            torch.testing.assert_close(p2[site][k], p1[site][k], rtol=0, atol=1e-6)
    # stage 2: the merged weights of the written programs
    w1 = torch.export.load(tmp_path / "r1.pt2").state_dict
    w2 = torch.export.load(tmp_path / "r2.pt2").state_dict
    assert sorted(w1) == sorted(w2)
    base = tiny_bert().ep.state_dict
    moved = [n for n in r1["stage2"]["weights"] if not torch.equal(w1[n], base[n])]
    assert moved == r1["stage2"]["weights"]  # stage 2 changed every adapted weight (the comparison is not vacuous)
    worst = max(float((w2[n] - w1[n]).abs().max()) for n in w1)
    assert worst <= 1e-5, worst
    for when, rel in (("after", 1e-5), ("before", 1e-6)):  # before: the untrained swap, measured on rank 1
        f1, f2 = r1["model_fidelity"][when]["outputs"], r2["model_fidelity"][when]["outputs"]
        assert sorted(f1) == sorted(f2)
        for name in f1:
            assert f2[name]["cosine"] == pytest.approx(f1[name]["cosine"], rel=rel)


def _reduce_worker(rank: int, world: int, init: str, late_rank: int, box: dict) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        split = RowSplit(rank=rank, world=world, group=dist.group.WORLD)
        params = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
        params[0].grad = torch.full((3,), float(rank + 1))
        params[1].grad = None if rank == 1 else torch.arange(4.0).reshape(2, 2)  # None counts as zero
        loss, late = split.reduce(params, 0.25 * (rank + 1), late=rank == late_rank)
        box[rank] = (loss, late, params[0].grad.tolist(), params[1].grad.tolist())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("late_rank", [-1, 0, 2])
def test_reduce_sums_grads_and_loss_and_agrees_on_late(late_rank: int, tmp_path: Path) -> None:
    """One all_reduce (gloo, 3 ranks) carries the grads, the loss and the late flag; every rank gets the same."""
    import torch.multiprocessing as mp
    world = 3
    with mp.Manager() as manager:
        box = manager.dict()
        mp.spawn(_reduce_worker, args=(world, f"file://{tmp_path / 'store'}", late_rank, box), nprocs=world)
        got = dict(box)
    for rank in range(world):
        loss, late, g0, g1 = got[rank]
        assert loss == pytest.approx(0.25 * (1 + 2 + 3))
        assert late is (late_rank >= 0)  # one late rank stops them all; none late: nobody stops
        assert g0 == [6.0, 6.0, 6.0]
        assert g1 == [[0.0, 2.0], [4.0, 6.0]]  # ranks 0 and 2 sent arange, rank 1 None


def test_one_process_reduce_is_the_identity() -> None:
    p = torch.ones(2, requires_grad=True)
    p.grad = torch.tensor([1.0, 2.0])
    assert RowSplit().reduce([p], 0.5, late=True) == (0.5, True)
    assert p.grad.tolist() == [1.0, 2.0]
