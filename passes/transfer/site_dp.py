"""Data parallelism inside one attention site's fit: a group of ranks shares each step's sample by rows.

With more ranks than replaced sites (a 2-layer model on 4 ranks, a 12-layer one on 16), site-level splitting
(:mod:`.distributed`) would leave ranks idle. Then every site gets a **group** of ranks (:func:`site_groups`:
rank ``r`` works on site ``r mod S``). At every step all ranks of a group take the same captured sample (the batch
order is a function of seed, site and step, :func:`passes.transfer.fit.batch_order`); member ``i`` of ``n`` takes
rows ``np.array_split(range(B), n)[i]`` of it (``B``: the batch axis of a 4-D q (batch, heads, tokens, dim) and of
every value with that leading size; values whose leading axis is 1 broadcast and stay whole), computes that slice's loss **normalised by
the whole sample's count** (:func:`passes.transfer.fit.site_loss` with ``rows``), and one ``all_reduce`` over the
group sums the gradients, the loss and the members' "past the deadline" flags. The summed gradient is the whole
sample's gradient, so every member takes the same Adam step as one process would, up to the order of
floating-point sums, and all members stop at the same step.

A sample that cannot be split that way (q not 4-D, a value with another leading size than q's other than 1, one row) is not split:
the group's first member computes it whole and the others contribute zero gradients (same sum, no speed-up).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

WHOLE = slice(None)  # a member that computes the whole sample (not split)


def site_groups(site_names: Sequence[str], world: int) -> dict[str, list[int]]:
    """Ranks per site when ``world`` exceeds the number of sites: rank ``r`` works on site ``r mod S`` (groups
    differ in size by at most one). Empty when there are at least as many sites as ranks (one rank per site)."""
    n = len(site_names)
    if n == 0 or world <= n:
        return {}
    return {name: [r for r in range(world) if r % n == i] for i, name in enumerate(site_names)}


def split_rows(sample: Sequence[Any], member: int, members: int) -> slice | None:
    """This member's rows of ``sample`` (a slice of its leading axis), :data:`WHOLE` when the sample cannot be
    split and this is the first member, None when this member has no rows (fewer rows than members, or an
    unsplittable sample and not the first member)."""
    # 4-D q (batch, heads, tokens, dim): rows are batch rows; a merged batch·heads axis is not split
    lead = sample[0].shape[0] if isinstance(sample[0], torch.Tensor) and sample[0].dim() == 4 else None
    splittable = lead is not None and lead > 1 and all(
        not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] in (lead, 1) for t in sample)
    if not splittable:
        return WHOLE if member == 0 else None
    part = np.array_split(np.arange(lead), members)[member]
    return slice(int(part[0]), int(part[-1]) + 1) if len(part) else None


def take_rows(sample: Sequence[Any], rows: slice) -> list[Any]:
    """``sample`` with every value whose leading axis is the sample's (q's) cut to ``rows``; broadcast values
    (leading axis 1 when q's is not) and non-tensors unchanged."""
    lead = sample[0].shape[0]
    return [t[rows] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == lead and lead != 1 else t
            for t in sample]


@dataclass
class SiteSplit:
    """One rank's place in its site's group: member ``member`` of ``members`` on process group ``group``."""

    member: int
    members: int
    group: Any
    rank: int = 0  # the global rank (for messages)

    def rows(self, sample: Sequence[Any]) -> slice | None:
        return split_rows(sample, self.member, self.members)

    def reduce(self, params: Sequence[torch.Tensor], loss: float, late: bool) -> tuple[float, bool]:
        """Sum every ``param.grad`` (None = zero) and ``loss`` over the group and agree on ``late`` (any member past
        its deadline) in one ``all_reduce``; returns (the whole sample's loss, any member late)."""
        from .stage2_dp import sum_grads
        return sum_grads(params, loss, late, self.group, self.rank, "fitting a site with its group of ranks")
