"""Capture split over the ranks of a distributed transfer: each rank runs the model on a share of the batches.

Without this every rank ran the whole calibration set through the model to record its own sites' values, so the
capture (a forward pass per batch: ~6 s of MiniLM's 2-rank run on a 2-core host) was serial work repeated on every
rank. Here rank ``r`` of ``N`` runs only the batches :func:`batch_owner` gives it, recording the values of **every**
rank's sites, and sends each other rank that rank's sites' values (``isend``/``recv`` on the transfer's process
group, gloo): each rank ends with its own sites' values on every batch, in batch order, as if it had captured them
itself.

Rounds: round ``j`` holds the ``N`` batches ``jN … jN+N−1``, one per rank (direction alternating every round, snake
order: batches are sorted by length). A rank runs its batch of round ``j``, posts its sends, then receives round
``j−1``'s values (sent while it was computing: no rank waits for another's forward pass), so it holds at most two
rounds of the other ranks' sites beyond its own samples, which go through the caller's ``keep`` into its store (RAM
or disk, :mod:`.capture_store`). Measured on MiniLM, 2 ranks, 2 cores: capture 6.4 → 4.2–4.5 s (of which ~1 s is
the ~180 MB each rank sends over loopback gloo).

Message per (sender, receiver, round): one int64 (header bytes), the header (a JSON list naming each site's
values: dtype and shape; a non-tensor value travels inside it), then every tensor on its own (received straight into
its own buffer, no unpacking copy). Every captured tensor is contiguous (:func:`passes.transfer.transfer._capture`
makes them so on every rank), so a value has the same layout whichever rank recorded it and the fits see the same
bits at any world size.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping, Sequence

import torch

from .distributed import collective

log = logging.getLogger(__name__)
#: What a rank was doing when it lost a peer here (its PeerLostError line).
EXCHANGING = "exchanging captured values"

Values = dict[str, list[Any]]  # site name -> its captured values on one batch


def batch_owner(index: int, world: int) -> int:
    """The rank that runs batch ``index`` through the model: round ``index // world`` goes up the ranks when even,
    down when odd (batches are sorted by length, so no rank always gets the longer batch of a round)."""
    round_, pos = divmod(index, world)
    return pos if round_ % 2 == 0 else world - 1 - pos


def _header(values: Values, sites: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(JSON header as bytes, the tensors to send after it, in order) for ``sites``' values on one batch: the header
    names each value's dtype and shape; a non-tensor value (a number, None) travels inside it. JSON, not pickle:
    what a peer sends is data, never code."""
    header: list[list[Any]] = []
    tensors: list[torch.Tensor] = []
    for name in sites:
        items: list[list[Any]] = []
        for v in values[name]:
            if isinstance(v, torch.Tensor):
                items.append(["t", str(v.dtype).removeprefix("torch."), list(v.shape)])
                if v.numel():
                    tensors.append(v.detach().contiguous())
            elif v is None or isinstance(v, (bool, int, float, str)):
                items.append(["v", v])
            else:
                from .transfer import TransferError
                raise TransferError(f"site {name}: captured value of type {type(v).__name__} cannot be sent to "
                                    "another rank; rerun with --sites-per-capture (every rank captures its own sites)")
        header.append([name, items])
    head = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
    return head, tensors


class _Round:
    """One round's state: batch index per capturing rank, this rank's values, its sends in flight."""

    def __init__(self, index_of: dict[int, int]) -> None:
        self.index_of = index_of
        self.local: Values | None = None
        self.sent: list[torch.Tensor] = []
        self.works: list[Any] = []


def _receive(peer: int, group: Any) -> Values:
    """The next batch's values from ``peer`` (header, then each tensor received into its own buffer)."""
    import torch.distributed as dist
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, peer, group=group)
    head = torch.empty(int(size[0]), dtype=torch.uint8)
    dist.recv(head, peer, group=group)
    out: Values = {}
    for name, items in json.loads(head.numpy().tobytes()):
        vals: list[Any] = []
        for item in items:
            if item[0] == "v":
                vals.append(item[1])
                continue
            t = torch.empty(item[2], dtype=getattr(torch, item[1]))
            if t.numel():
                dist.recv(t, peer, group=group)
            vals.append(t)
        out[name] = vals
    return out


def capture_split(batches: Sequence[Any], capture: Callable[[Any], Values],
                  owners: Mapping[str, int | Sequence[int]],
                  shard: Any, keep: Callable[[str, list[Any]], None]) -> int:
    """Capture ``batches`` split over ``shard``'s ranks; returns how many batches this rank ran.

    ``capture(batch)`` returns the values of every site in ``owners`` (site name -> the rank, or ranks, that fit
    it; every rank passes the same mapping) on one batch; ``keep(site, values)`` receives this rank's sites'
    values, batch by batch in order. Every rank must call this with the same batches. A peer that dies mid-exchange raises
    :class:`passes.transfer.distributed.PeerLostError`.
    """
    import torch.distributed as dist
    world, me, group = shard.world, shard.rank, shard.group
    ranks_of = {s: {r} if isinstance(r, int) else set(r) for s, r in owners.items()}
    mine = [s for s, rs in ranks_of.items() if me in rs]
    to_rank = {r: [s for s, rs in ranks_of.items() if r in rs] for r in range(world)}
    ran = 0
    previous: _Round | None = None
    for start in [*range(0, len(batches), world), None]:
        current = None
        if start is not None:  # run this rank's batch of the round and send the other ranks their sites' values
            current = _Round({batch_owner(i, world): i for i in range(start, min(start + world, len(batches)))})
            if me in current.index_of:
                current.local = capture(batches[current.index_of[me]])
                ran += 1
                outgoing = []
                for peer in range(world):
                    if peer != me:
                        head, tensors = _header(current.local, to_rank[peer])
                        outgoing += [(peer, t) for t in (torch.tensor([head.numel()]), head, *tensors)]
                current.sent = [t for _, t in outgoing]  # alive until the sends complete
                with collective(me, EXCHANGING):
                    current.works = [dist.isend(t, peer, group=group) for peer, t in outgoing]
        if previous is not None:  # the round before: its messages arrived while this rank ran its batch
            for i in sorted(previous.index_of.values()):
                owner = batch_owner(i, world)
                if owner == me:
                    values = previous.local
                else:
                    with collective(me, EXCHANGING):
                        values = _receive(owner, group)
                for name in mine:
                    keep(name, values[name])
            with collective(me, EXCHANGING):
                for work in previous.works:
                    work.wait()
        previous = current
    log.info("rank %d captured %d of %d batches (the others' came from their ranks)", me, ran, len(batches))
    return ran
