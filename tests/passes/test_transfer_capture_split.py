"""Capture split over ranks (passes/transfer/capture_split.py): real gloo process groups on 127.0.0.1.

Reference: the values a single process records on every batch. Each rank of a split capture must end with exactly
its own sites' values, every batch, in batch order, bit for bit — dtypes (float32, int64, bool), empty tensors and
non-tensor values included — for world sizes that divide the batch count and ones that leave a partial last round.
A rank that dies mid-exchange must turn into PeerLostError on the survivor, not a hang or a gloo traceback.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from passes.transfer.capture_split import batch_owner

N_BATCHES = 7
SITES = ["attn0", "attn1", "attn2", "attn3", "attn4"]


def _values(batch: int, site: str) -> list[Any]:
    """What a capture of ``site`` on ``batch`` returns (deterministic, varied shapes and dtypes)."""
    g = torch.Generator().manual_seed(1000 * batch + SITES.index(site))
    length = 3 + batch  # batches grow, as sorted calibration batches do
    q = torch.randn(2, 4, length, 8, generator=g)
    mask = torch.rand(2, 1, 1, length, generator=g) > 0.3
    ids = torch.randint(0, 1 << 40, (2, length), generator=g)
    return [q, q.transpose(-1, -2).contiguous() * 2, mask, ids, torch.empty(0, 5), float(batch) / 3, None]


def _rank_main(rank: int, world: int, store_path: str, out: str, die_after: int | None) -> None:
    try:
        import torch.distributed as dist

        from passes.transfer.capture_split import capture_split
        from passes.transfer.distributed import PeerLostError, Shard
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        # both ranks connected before the exchange: else rank 1 can finish its side of gloo's connect, capture and
        # die while a loaded rank 0 is still inside init_process_group (a gloo error there, not the exchange's
        # PeerLostError this test is about; seen once under CI load)
        dist.barrier()
        shard = Shard(rank=rank, world=world, group=dist.group.WORLD)
        owners = {s: i % world for i, s in enumerate(SITES)}
        ran: list[int] = []

        def capture(batch: int) -> dict[str, list[Any]]:
            if die_after is not None and rank == 1 and len(ran) == die_after:
                os._exit(3)  # a killed rank
            ran.append(batch)
            return {s: _values(batch, s) for s in SITES}

        kept: list[tuple[str, list[Any]]] = []
        try:
            n = capture_split(list(range(N_BATCHES)), capture, owners, shard, lambda s, v: kept.append((s, v)))
            result: Any = {"ran": ran, "n": n, "kept": kept}
        except PeerLostError as exc:
            result = {"lost": str(exc)}
        Path(out).write_bytes(pickle.dumps(result))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        Path(out).write_text("ERROR " + traceback.format_exc())


def _run(world: int, tmp_path: Path, die_after: int | None = None) -> list[Any]:
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"r{r}.pkl" for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, str(tmp_path / "store"), str(outs[r]), die_after))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode is not None, "a rank hung"
    results = []
    for r, o in enumerate(outs):
        if die_after is not None and r == 1:
            results.append(None)
            continue
        raw = o.read_bytes()
        assert not raw.startswith(b"ERROR"), raw.decode()
        results.append(pickle.loads(raw))
    return results


def _same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_gets_its_sites_on_every_batch_in_order(world: int, tmp_path: Path) -> None:
    results = _run(world, tmp_path)
    ran_total = []
    for rank, res in enumerate(results):
        mine = [s for i, s in enumerate(SITES) if i % world == rank]
        expected = [(s, _values(b, s)) for b in range(N_BATCHES) for s in mine]
        assert [s for s, _ in res["kept"]] == [s for s, _ in expected]
        for (_, got), (_, want) in zip(res["kept"], expected):
            _same(got, want)
        assert res["n"] == len(res["ran"]) and res["ran"] == [b for b in range(N_BATCHES) if batch_owner(b, world) == rank]
        ran_total += res["ran"]
    assert sorted(ran_total) == list(range(N_BATCHES))  # every batch run once, by one rank


def test_batch_owner_gives_each_rank_one_batch_per_round_in_snake_order() -> None:
    for world in (1, 2, 3, 5):
        for start in range(0, 40, world):
            owners = [batch_owner(i, world) for i in range(start, start + world)]
            assert sorted(owners) == list(range(world))
            assert owners == (list(range(world)) if (start // world) % 2 == 0 else list(range(world))[::-1])


def test_a_rank_dying_mid_exchange_is_a_lost_peer(tmp_path: Path) -> None:
    results = _run(2, tmp_path, die_after=1)
    assert "lost" in results[0], results[0]
    assert results[0]["lost"].startswith("rank 0: lost contact with another rank while exchanging captured values")


def test_a_value_json_cannot_carry_is_a_clear_error() -> None:
    """The header is JSON (a peer sends data, never code): a captured value that is neither a tensor nor a plain
    number/None/string is refused with the site's name, before anything is sent."""
    from passes.transfer.capture_split import _header
    from passes.transfer.transfer import TransferError
    head, tensors = _header({"attn0": [torch.ones(2, 3), 0.5, None]}, ["attn0"])
    assert len(tensors) == 1 and bytes(head.numpy()).startswith(b'[["attn0"')
    with pytest.raises(TransferError, match="site attn0: captured value of type object"):
        _header({"attn0": [torch.ones(2), object()]}, ["attn0"])
