"""Wall time per phase of a transfer run (``report["phases"]``), to see where the time goes and what ranks split.

Phases: ``load`` (model load, graph view, site recognition), ``calibration`` (reading / tokenizing the data),
``capture`` (running the original on the calibration batches), ``fit`` (per-site fits and their held-out site
fidelity), ``gather`` (rank 0: waiting for the other ranks' params), ``rewrite`` (writing the fitted params into the
graph), ``stage2``, ``model_fidelity``, ``export``. Seconds, accumulated over repeated entries of a phase.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class PhaseClock:
    """Accumulates wall seconds per named phase; :meth:`as_dict` gives them rounded to 10 ms."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + float(seconds)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}
