"""Data parallelism for LoLCATs stage 2 (:mod:`.stage2`) over the ranks of a distributed transfer.

Stage 2 trains one set of low-rank factors end to end, one calibration batch per Adam step. With ``N`` ranks every
rank runs the **same** step on its own slice of that batch's rows (rank ``r`` takes ``np.array_split(rows, N)[r]``),
and the gradients are summed over the ranks (``all_reduce`` on the transfer's process group, gloo on CPU). Each
rank's loss is its slice's loss scaled by its share of the batch's loss weight (masked tokens, or rows without a
mask), so the sum of the ranks' gradients is the gradient of the whole batch's loss: the same Adam steps as one
process, up to the order of floating-point sums (the tests allow 1e-5 on the merged weights). Exact when the loss
is the masked mean (the first output is (batch, tokens, ...) and the batch has an ``attention_mask``) or the batch
has no mask; with a mask but another output shape the slices are weighted by their mask sums (an approximation). Initialisation and
batch order come from the seed on every rank alike, so all ranks hold the same factors after every step.

A wall-clock deadline is agreed on: before the first step a one-element ``all_reduce`` (max) of "this rank is past
its deadline", then one more element of every step's gradient ``all_reduce`` (the count of late ranks), so all ranks
stop at the same step with one collective per step. One process (``group`` None) is the identity: its own batch,
share 1, no communication.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .distributed import collective

log = logging.getLogger(__name__)
#: What a rank was doing when it lost a peer here (its PeerLostError line).
STAGE2 = "running stage 2"

Batch = dict[str, np.ndarray]


def _weight(batch: Batch, rows: int) -> float:
    """The loss normaliser of ``stage2._loss`` for ``batch``: its attention-mask sum when it has a mask, else rows."""
    mask = batch.get("attention_mask")
    return float(np.asarray(mask).sum()) if mask is not None else float(rows)


def sum_grads(params: Sequence[torch.Tensor], loss: float, late: bool, group: Any, rank: int,
              doing: str) -> tuple[float, bool]:
    """One ``all_reduce`` (SUM) over ``group`` of every ``param.grad`` (None counts as zero), ``loss`` and the
    ``late`` flag; the grads are replaced by the sums. Returns (summed loss, any rank late). A lost peer raises
    :class:`.distributed.PeerLostError` for rank ``rank`` ``doing`` this. Used by stage 2 (:class:`RowSplit`) and
    by a site's group of ranks in stage 1 (:mod:`.site_dp`)."""
    import torch.distributed as dist
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     + [torch.tensor([float(loss), 1.0 if late else 0.0], dtype=params[0].dtype)])
    with collective(rank, doing):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    at = 0
    for p in params:
        n = p.numel()
        p.grad = flat[at:at + n].view_as(p).clone()
        at += n
    return float(flat[-2]), bool(flat[-1].item() > 0)


@dataclass
class RowSplit:
    """This rank's share of every stage-2 batch (``rank`` of ``world``; ``group`` a torch process group or None)."""

    rank: int = 0
    world: int = 1
    group: Any = None

    @classmethod
    def of(cls, shard: Any) -> "RowSplit":
        """The split for a :class:`passes.transfer.distributed.Shard` (None or one rank: one process, no split)."""
        if shard is None or getattr(shard, "world", 1) <= 1 or getattr(shard, "group", None) is None:
            return cls()
        return cls(rank=shard.rank, world=shard.world, group=shard.group)

    def local(self, batch: Batch) -> tuple[Batch | None, float]:
        """(this rank's rows of ``batch`` or None when it gets none, the factor its slice's loss is scaled by)."""
        if self.world == 1:
            return batch, 1.0
        rows = len(next(iter(batch.values())))
        part = np.array_split(np.arange(rows), self.world)[self.rank]
        if len(part) == 0:
            return None, 0.0
        mine = {k: np.ascontiguousarray(np.asarray(v)[part[0]:part[-1] + 1]) for k, v in batch.items()}
        total = _weight(batch, rows)
        return mine, (_weight(mine, len(part)) / total if total > 0 else 0.0)

    def stop(self, late: bool) -> bool:
        """Whether any rank is past its deadline (all ranks get the same answer)."""
        if self.world == 1:
            return late
        import torch.distributed as dist
        flag = torch.tensor([1.0 if late else 0.0])
        with collective(self.rank, STAGE2):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item() > 0)

    def reduce(self, params: Sequence[torch.Tensor], loss: float, late: bool = False) -> tuple[float, bool]:
        """Sum every ``param.grad`` (None counts as zero) and the scaled ``loss`` over the ranks, and agree on
        whether any rank is ``late`` (past its deadline), in one ``all_reduce``; returns (the whole batch's loss,
        any rank late). The grads are replaced in place by the sums. One collective per step: a separate stop
        check would make every step wait twice for the slower rank."""
        if self.world == 1:
            return float(loss), late
        return sum_grads(params, loss, late, self.group, self.rank, STAGE2)
