"""Head-only training on frozen features: mini-batch Adam in float64 with a seed, a step budget, an optional time
budget (minutes) and a rich progress bar (as ``softswap transfer`` shows)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


@dataclass
class TrainLog:
    """What a training run did: steps taken, the last mini-batch loss, wall seconds, why it stopped."""

    steps: int
    loss: float
    seconds: float
    stopped_by: str  # "steps" | "time"

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "loss": round(self.loss, 6), "seconds": round(self.seconds, 3),
                "stopped_by": self.stopped_by}


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar (steps done / total, last loss, elapsed); disabled when ``enabled`` is False."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), disable=not enabled,
                    transient=False)


def train_head(module: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
               features: torch.Tensor, targets: torch.Tensor, *, steps: int, lr: float, batch: int, seed: int,
               minutes: float | None = None, progress: bool = False, description: str = "head") -> TrainLog:
    """Train ``module`` (in place) for ``steps`` Adam steps on mini-batches of (``features``, ``targets``) drawn by
    a seeded permutation per epoch; stop early when ``minutes`` of wall time have passed. ``loss_fn(module, f, t)``
    returns the scalar loss of one mini-batch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    n = features.shape[0]
    batch = max(1, min(batch, n))
    start = time.perf_counter()
    deadline = start + 60.0 * minutes if minutes is not None else None
    done, last, stopped = 0, float("nan"), "steps"
    module.train()
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=steps, loss="-")
        while done < steps:
            for idx in torch.randperm(n, generator=gen).split(batch):
                if done >= steps:
                    break
                if deadline is not None and time.perf_counter() > deadline:
                    stopped = "time"
                    break
                opt.zero_grad()
                loss = loss_fn(module, features[idx], targets[idx])
                loss.backward()
                opt.step()
                done += 1
                last = float(loss.detach())
                bar.update(task, advance=1, loss=f"{last:.4f}")
            if stopped == "time":
                break
    module.eval()
    seconds = time.perf_counter() - start
    if stopped == "time":
        log.warning("%s: time budget of %.2f min reached after %d of %d steps", description, minutes, done, steps)
    return TrainLog(done, last, seconds, stopped)
