"""LoLCATs stage 2: low-rank adaptation of the attention projections, trained end to end, merged into the weights.

After stage 1 (per-site fitting of the replacement's own params, :mod:`.transfer`) the rewritten FX program is
fine-tuned as a whole: every 2-D weight whose qualified name contains one of ``targets`` (Hugging Face BERT names:
``attention.self.query`` / ``key`` / ``value``, ``attention.output.dense``) gets a rank-``rank`` update
``W + (alpha / rank) · B A`` (``A`` seeded Gaussian / √in, ``B`` zero, so training starts at the stage-1 model).
Only ``A`` and ``B`` train (Adam), with loss = MSE between the rewritten model's first output and the original
model's, over tokens with ``attention_mask`` = 1 when the batch has one. The trained update is then **added into the
weights** of the exported program (``ep.state_dict``), so the graph stays plain: no adapter ops, the same ops as
before, exportable to ONNX by the usual path.

Contract: FX-kind models only (the rewritten program of :func:`passes.transfer.transfer` on an FX / Hugging Face
model). Deterministic for a given ``seed`` (initialisation and batch order). Units: ``lr`` per Adam step.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from rewrite.io import LoadedModel
from rewrite.verify import runner

from .data import Batch
from .phases import PhaseClock
from .stage2_dp import RowSplit
from .transfer import TransferError

log = logging.getLogger(__name__)

#: Substrings of the weight names adapted by default (Hugging Face BERT-family attention projections).
DEFAULT_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def _target_weights(gm: torch.nn.Module, targets: Sequence[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in gm.named_parameters():
        if name.endswith("weight") and p.ndim == 2 and any(t in name for t in targets):
            out[name] = p.detach()
    return out


#: Stage-2 steps of the default recipe (``stage2_steps=None``) where stage 2 applies.
DEFAULT_STAGE2_STEPS = 600
#: With a wall-clock budget (``minutes``) and stage 2 on, the share of the budget stage 1 gets (stage 2: the rest).
STAGE1_SHARE = 0.5


def stage2_plan(model: LoadedModel, steps: int | None, *, real_data: bool = True,
                targets: Sequence[str] = DEFAULT_TARGETS) -> tuple[int, str | None]:
    """(steps stage 2 will run, reason it will not run or None) for ``model`` (the original or the rewritten one).

    ``steps`` None is the default: ``DEFAULT_STAGE2_STEPS`` when the calibration is real data (``real_data``: not
    the synthetic-id fallback, on which end-to-end training would fit noise) and the model is an FX program with
    weights named by ``targets``; else 0 with the reason. An explicit ``steps`` > 0 on a model stage 2 cannot
    train raises :class:`TransferError` (naming the model); 0 is off without a reason.
    """
    if steps == 0:
        return 0, None
    if steps is None and not real_data:
        return 0, "calibration is synthetic ids (no tokenizer); stage 2 is not run on them by default"
    if model.kind != "fx" or model.ep is None:
        why = (f"{model.source}: stage 2 needs an FX program (a .pt2, nn.Module or Hugging Face folder); "
               f"a {model.kind} graph is not trained end to end")
    elif not _target_weights(model.ep.module(), targets):
        why = f"{model.source}: no 2-D weight name contains any of {list(targets)} (stage 2 adapts those)"
    else:
        return (DEFAULT_STAGE2_STEPS if steps is None else int(steps)), None
    if steps is not None:
        raise TransferError(f"stage2_steps={steps}: {why}")
    return 0, why


def _merged(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``w + scale · (b @ a)``. With ``scale`` a power of two (the default alpha 16 / rank 8 = 2) as one fused
    ``addmm``: the same bits (scaling by 2^k is exact, and the product's K-sum is the same kernel's), measured 7.0 →
    3.9 ms per step for MiniLM's 24 weights and ~1.5 ms less backward (fewer autograd nodes); else the three ops."""
    if scale > 0 and math.frexp(scale)[0] == 0.5:
        return torch.addmm(w, b, a, alpha=scale)
    return w + scale * (b @ a)


def _teacher(original: LoadedModel, batches: list[Batch | None]) -> list[torch.Tensor | None]:
    """The original's first output on each batch (None stays None); its module is built once for all batches."""
    name = original.output_names[0]
    run_original = runner(original)
    return [None if b is None else torch.as_tensor(np.asarray(run_original(b)[name]), dtype=torch.float32)
            for b in batches]


def _loss(out: torch.Tensor, ref: torch.Tensor, batch: Batch) -> torch.Tensor:
    diff = (out - ref) ** 2
    mask = batch.get("attention_mask")
    if mask is not None and diff.ndim == 3 and tuple(mask.shape) == tuple(diff.shape[:2]):
        m = torch.as_tensor(mask, dtype=diff.dtype)[..., None]
        return (diff * m).sum() / (m.sum() * diff.shape[-1]).clamp_min(1.0)
    return diff.mean()


@contextmanager
def _frozen(gm: torch.nn.Module) -> Iterator[None]:
    """Every parameter of ``gm`` with ``requires_grad`` off inside the block; the flags restored on leaving it."""
    flags = [(p, p.requires_grad) for p in gm.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _train(gm: torch.nn.Module, weights: dict[str, torch.Tensor],
           factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float, opt: torch.optim.Optimizer,
           shares: list[tuple[Batch | None, float]], refs: list[torch.Tensor | None], *, steps: int, seed: int,
           split: RowSplit, deadline: float | None, clock: PhaseClock) -> list[float]:
    """Stage 2's Adam loop; returns the whole batch's loss per step. ``clock`` gets the wall seconds of ``agree``
    (the stop check before the first step), ``forward`` (W + s·BA and the program run), ``backward``, ``reduce``
    (the gradient all_reduce, including waiting for the slower rank) and ``optimizer``."""
    trainable = [t for ab in factors.values() for t in ab]
    order = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []

    def late() -> bool:
        return deadline is not None and time.time() > deadline

    with clock("agree"):
        stop = split.stop(late())  # once; then every step's all_reduce carries the flag: all ranks stop together
    while not stop and len(losses) < steps:
        i = int(torch.randint(len(shares), (1,), generator=order))
        batch, share = shares[i]
        opt.zero_grad()
        loss = torch.zeros(())
        if batch is not None:  # None: this rank has no rows of a batch smaller than the world
            with clock("forward"):
                feeds = {k: torch.as_tensor(v) for k, v in batch.items()}
                override = {n: _merged(w, a, b, scale)
                            for n, (w, (a, b)) in zip(weights, zip(weights.values(), factors.values()))}
                out = torch.func.functional_call(gm, override, (), feeds)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = _loss(out, refs[i], batch) * share
            with clock("backward"):
                loss.backward()
        with clock("reduce"):  # grads summed over ranks (waiting for the slower one); the batch loss; any rank late
            total, stop = split.reduce(trainable, float(loss.detach()), late())
        losses.append(total)
        with clock("optimizer"):
            opt.step()
    return losses


def lora_stage2(fitted: LoadedModel, original: LoadedModel, train: list[Batch], *, rank: int = 8,
                alpha: float = 16.0, steps: int = 100, lr: float = 1e-3, seed: int = 0,
                targets: Sequence[str] = DEFAULT_TARGETS, minutes: float | None = None,
                dp: Any = None) -> dict[str, Any]:
    """Fine-tune low-rank updates of ``fitted``'s attention projections against ``original`` and merge them.

    ``fitted`` (FX) is modified in place: its program's weights become ``W + (alpha/rank) B A``. Returns a report
    ``{"weights": [names], "rank", "steps", "seconds", "loss_first", "loss_last", "timing"}`` (``timing``: this
    rank's wall seconds of ``teacher`` and, summed over the steps, ``agree`` / ``forward`` / ``backward`` /
    ``reduce`` / ``optimizer``). Raises :class:`TransferError` for a non-FX model or when no weight matches
    ``targets``. ``dp``: the distributed transfer's :class:`passes.transfer.distributed.Shard` — every rank calls
    this with the same arguments and trains on its slice of each batch's rows, gradients summed over the ranks
    (:mod:`.stage2_dp`); None = one process.
    """
    if fitted.kind != "fx" or fitted.ep is None:
        raise TransferError(f"{fitted.source}: LoRA stage 2 needs an FX program (got {fitted.kind})")
    if rank < 1 or steps < 0:
        raise TransferError(f"stage 2: rank must be >= 1 and steps >= 0 (got rank={rank}, steps={steps})")
    gm = fitted.ep.module()
    weights = _target_weights(gm, targets)
    if not weights:
        raise TransferError(f"{fitted.source}: no 2-D weight name contains any of {list(targets)} for LoRA stage 2")
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    factors = {}
    for name, w in weights.items():
        a = (torch.randn(rank, w.shape[1], generator=gen) / w.shape[1] ** 0.5).requires_grad_(True)
        b = torch.zeros(w.shape[0], rank, requires_grad=True)
        factors[name] = (a, b)
    trainable = [t for ab in factors.values() for t in ab]
    opt = torch.optim.Adam(trainable, lr=lr)
    # only the low-rank factors train: without this, backward also builds every program weight's gradient
    # (measured 1.5x the step time on MiniLM); the flags are restored (also on an exception) before the merge
    clock = PhaseClock()  # report["timing"]: wall seconds per part of stage 2 (where a rank's step time goes)
    with _frozen(gm):
        split = RowSplit.of(dp)  # data parallel over ranks (.stage2_dp); one process: the whole batch, share 1
        shares = [split.local(b) for b in train]
        with clock("teacher"):
            refs = _teacher(original, [b for b, _ in shares])
        losses = _train(gm, weights, factors, scale, opt, shares, refs, steps=steps, seed=seed, split=split,
                        deadline=t0 + 60.0 * minutes if minutes is not None else None, clock=clock)
    # merge into the program's weights: the graph keeps its ops, only the tensors change
    with torch.no_grad():
        for name, (a, b) in factors.items():
            old = fitted.ep.state_dict[name]
            new = _merged(weights[name], a, b, scale).detach().clone().contiguous().to(old.dtype)
            # a new tensor (never in place: the stage-1 program may share storage with the original model)
            fitted.ep.state_dict[name] = torch.nn.Parameter(new, requires_grad=old.requires_grad) \
                if isinstance(old, torch.nn.Parameter) else new
    report = {"weights": sorted(weights), "rank": rank, "alpha": alpha, "steps": len(losses),
              "seconds": round(time.time() - t0, 2), "loss_first": losses[0] if losses else None,
              "loss_last": losses[-1] if losses else None, "timing": clock.as_dict()}
    log.info("LoRA stage 2: %d weights, rank %d, %d steps, loss %s -> %s", len(weights), rank, len(losses),
             report["loss_first"], report["loss_last"])
    return report
