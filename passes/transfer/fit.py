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


def site_loss(module: SiteModule, sample: Sample, config: FitConfig) -> torch.Tensor:
    """λ_mse · mean squared error of the module's output against the captured softmax output, plus
    λ_ce · the attention-map cross-entropy (:func:`.attention_ce.attention_ce`) when ``config.lambda_ce`` > 0."""
    out = module(*sample[:-1])
    target = sample[-1]
    loss = config.lambda_mse * torch.mean((out.float() - target.float()) ** 2)
    if config.lambda_ce:
        from .attention_ce import attention_ce
        loss = loss + config.lambda_ce * attention_ce(module, sample)
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
             on_save: Callable[[SiteState], None] | None = None, save_every_s: float = 30.0) -> SiteState:
    """Train ``module.params`` on ``train`` from ``state`` until ``total_steps`` or the ``deadline`` (time.time()).

    ``module`` must already hold ``state.params``. Returns the updated state (params copied out of the module).
    ``on_step(step, loss)`` is called after every step; ``on_save(state)`` at most every ``save_every_s``.
    """
    if not len(module.params) or not train:
        return state
    opt = _optimizer(module, config)
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    module.train()
    started = time.time()
    last_save = started
    step = state.step
    while (total_steps is None or step < total_steps) and (deadline is None or time.time() < deadline or step == state.step):
        sample = train[batch_order(len(train), step, seed, site_index)]
        opt.zero_grad(set_to_none=True)
        loss = site_loss(module, sample, config)
        if not torch.isfinite(loss):
            log.warning("site %d: non-finite loss at step %d; stopping this site", site_index, step)
            break
        loss.backward()
        opt.step()
        step += 1
        value = float(loss.detach())
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
