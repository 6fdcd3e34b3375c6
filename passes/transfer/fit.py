"""Fit one attention site's replacement parameters to its softmax original.

The teacher is the captured softmax output of the site; the student is the site's
:class:`rewrite.binding.SiteModule` fed the *captured* q, k, v and mask values (teacher forcing, as LoLCATs stage 1:
every site trains independently on the original model's activations). Loss (LoLCATs default):

    L = λ_mse · MSE(y_student, y_teacher)        with λ_mse = 1000, over every element of the site output

(per-head outputs before the output projection). Optimizer: Adam; matrices (Hedgehog maps) at ``lr`` (1e-2, the
paper's stage-1 rate), per-head scalars (bias / log-temperature / window gate) at ``scalar_lr``.

Determinism: the batch used at step ``t`` is a pure function of (seed, site index, t) — a seeded permutation per
epoch — so N steps + resume N steps equals 2N steps in one run (optimizer state travels in the checkpoint).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rewrite.attention_pass import fidelity as _fidelity
from rewrite.binding import SiteModule

log = logging.getLogger(__name__)

#: One captured call of a site: [q, k, v, *mask_values, original_output].
Sample = list[torch.Tensor]

LAMBDA_MSE = 1000.0


@dataclass
class FitConfig:
    """Hyper-parameters of the per-site fit. ``lr``/``scalar_lr``: Adam rates for tensors of rank ≥ 2 / ≤ 1."""

    lr: float = 1e-2
    scalar_lr: float = 1e-1
    lambda_mse: float = LAMBDA_MSE
    #: Weight of the attention-weight cross-entropy term (:mod:`.attention_ce`); 0 = off (the LoLCATs default).
    lambda_ce: float = 0.0


@dataclass
class SiteState:
    """What the checkpoint keeps per site: parameters, finished steps, optimizer state, seconds spent."""

    params: dict[str, torch.Tensor]
    step: int = 0
    optimizer: dict[str, Any] | None = None
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"params": {k: v.detach().clone() for k, v in self.params.items()}, "step": self.step,
                "optimizer": self.optimizer, "seconds": self.seconds, "losses": list(self.losses)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiteState":
        return cls(params=dict(d["params"]), step=int(d["step"]), optimizer=d.get("optimizer"),
                   seconds=float(d.get("seconds", 0.0)), losses=list(d.get("losses", [])))


def site_loss(module: SiteModule, sample: Sample, config: FitConfig, rows: slice | None = None) -> torch.Tensor:
    """λ_mse · mean squared error of the module's output against the captured softmax output, plus
    λ_ce · the attention-map cross-entropy (:func:`.attention_ce.attention_ce`) when ``config.lambda_ce`` > 0.

    ``rows``: only those rows of the sample's leading axis (:mod:`.site_dp`), with both terms still normalised by
    the **whole** sample's counts, so the losses (and gradients) of a partition of the rows add up to the whole's."""
    if rows is None:
        out = module(*sample[:-1])
        loss = config.lambda_mse * torch.mean((out.float() - sample[-1].float()) ** 2)
    else:
        from .site_dp import take_rows
        part = take_rows(sample, rows)
        out = module(*part[:-1])
        loss = config.lambda_mse * (((out.float() - part[-1].float()) ** 2).sum() / max(sample[-1].numel(), 1))
    if config.lambda_ce:
        from .attention_ce import attention_ce, ce_normaliser
        if rows is None:
            loss = loss + config.lambda_ce * attention_ce(module, sample)
        else:
            loss = loss + config.lambda_ce * attention_ce(module, part, normaliser=ce_normaliser(module, sample))
    return loss


def batch_order(n_batches: int, step: int, seed: int, site_index: int) -> int:
    """Index of the batch used at ``step``: epoch-wise seeded permutations, a pure function of its arguments."""
    epoch, pos = divmod(step, n_batches)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + site_index * 10_007 + epoch) % (2 ** 63))
    return int(torch.randperm(n_batches, generator=gen)[pos])


def _optimizer(module: SiteModule, config: FitConfig) -> torch.optim.Optimizer:
    mats = [p for p in module.params.values() if p.dim() >= 2]
    scal = [p for p in module.params.values() if p.dim() < 2]
    groups = []
    if mats:
        groups.append({"params": mats, "lr": config.lr})
    if scal:
        groups.append({"params": scal, "lr": config.scalar_lr})
    return torch.optim.Adam(groups)


def fit_site(module: SiteModule, train: Sequence[Sample], state: SiteState, *, total_steps: int | None,
             deadline: float | None, seed: int, site_index: int, config: FitConfig,
             on_step: Callable[[int, float], None] | None = None,
             on_save: Callable[[SiteState], None] | None = None, save_every_s: float = 30.0,
             split: Any = None) -> SiteState:
    """Train ``module.params`` on ``train`` from ``state`` until ``total_steps`` or the ``deadline`` (time.time()).

    ``module`` must already hold ``state.params``. Returns the updated state (params copied out of the module).
    ``on_step(step, loss)`` is called after every step; ``on_save(state)`` at most every ``save_every_s``.
    ``split``: a :class:`.site_dp.SiteSplit` when a group of ranks fits this site together (each takes its rows
    of every step's sample, gradients summed over the group; the deadline and a non-finite loss are agreed on, so
    all members take the same steps); None = this process alone.
    """
    if not len(module.params) or not train:
        return state
    opt = _optimizer(module, config)
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    params = list(module.params.values())
    module.train()
    started = time.time()
    last_save = started
    step = state.step
    stop = False  # with a group: the members agreed that one of them is past its deadline

    def alone_in_time() -> bool:  # alone: the local clock (the first step always runs); a group agrees per step
        return split is not None or deadline is None or time.time() < deadline or step == state.step

    while not stop and (total_steps is None or step < total_steps) and alone_in_time():
        sample = train[batch_order(len(train), step, seed, site_index)]
        opt.zero_grad(set_to_none=True)
        if split is None:
            loss = site_loss(module, sample, config)
            value = float(loss.detach())
            if math.isfinite(value):
                loss.backward()
        else:
            value, stop = _group_gradient(module, sample, config, split, params, deadline)
        if not math.isfinite(value):
            log.warning("site %d: non-finite loss at step %d; stopping this site", site_index, step)
            break
        opt.step()
        step += 1
        if step % 10 == 0 or step == 1:
            state.losses.append(round(value, 6))
        if on_step is not None:
            on_step(step, value)
        if on_save is not None and time.time() - last_save > save_every_s:
            _sync(state, module, opt, step, started)
            on_save(state)
            last_save = time.time()
            started = last_save
    _sync(state, module, opt, step, started)
    module.eval()
    return state


def _group_gradient(module: SiteModule, sample: Sample, config: FitConfig, split: Any,
                    params: list[torch.Tensor], deadline: float | None) -> tuple[float, bool]:
    """One step's gradient for a member of a site's group of ranks (:mod:`.site_dp`): this member's rows' loss
    (normalised by the whole sample) backpropagated, then gradients, loss and deadline flags summed over the group.
    Returns (the whole sample's loss, whether any member is past its deadline)."""
    from .site_dp import WHOLE
    rows = split.rows(sample)
    local = 0.0
    if rows is not None:
        loss = site_loss(module, sample, config, rows=None if rows is WHOLE else rows)
        local = float(loss.detach())
        if math.isfinite(local):
            loss.backward()
    return split.reduce(params, local, deadline is not None and time.time() >= deadline)


def _sync(state: SiteState, module: SiteModule, opt: torch.optim.Optimizer, step: int, started: float) -> None:
    state.params = {k: v.detach().clone() for k, v in module.params.items()}
    state.step = step
    state.optimizer = opt.state_dict()
    state.seconds += time.time() - started


def evaluate(module: SiteModule, samples: Sequence[Sample]) -> dict[str, float]:
    """Site fidelity over all ``samples`` together: cosine and relative error (Frobenius) of the flattened outputs
    against the captured softmax outputs (:func:`rewrite.attention_pass.fidelity`), plus the loss-scale MSE."""
    refs, cands = [], []
    with torch.no_grad():
        for s in samples:
            cands.append(module(*s[:-1]).reshape(-1).double())
            refs.append(s[-1].reshape(-1).double())
    ref, cand = torch.cat(refs), torch.cat(cands)
    out = _fidelity(ref, cand)
    out["mse"] = float(torch.mean((ref - cand) ** 2))
    return out
