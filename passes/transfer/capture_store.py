"""Memory-bounded capture for attention transfer: captured site values spill to disk past a byte budget.

Transfer captures, per site and calibration batch, one *sample* ``[q, k, v, *mask values, softmax output]``
(:data:`passes.transfer.fit.Sample`). Held in RAM these grow with the calibration set (the softmax output alone is
B·H·L² floats per batch and site). A :class:`CaptureStore` with ``max_memory`` bytes keeps samples in RAM until
their total would exceed the budget; every later sample is written to a per-list data file (raw bytes, appended) in
a temporary folder and read back one sample at a time when the fit asks for it (``a read at an offset, so
only the sample being used is resident: no mapping stays open to count against the process's RSS). The folder is
hidden (``.capture.softswap-tmp-<pid>-<random>``) under ``parent`` (the checkpoint's or output's folder; the
system temp folder when neither is given) and removed when the store closes; a killed run's folder is removed by the
next softswap write in that folder (:func:`rewrite.atomic.clean_stale`).

``max_memory=None`` keeps everything in RAM (the previous behaviour); ``0`` sends every sample to disk.
:func:`evaluate` computes site fidelity streaming over disk-backed samples (same quantities as
:func:`passes.transfer.fit.evaluate`, accumulated in float64 instead of concatenated).
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Prefix of the temporary folder (matches rewrite.atomic's stale-temporary pattern).
FOLDER_TAG = ".capture.softswap-tmp-"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int, flag: str = "--max-memory") -> int:
    """Bytes from ``"1073741824"``, ``"512M"``, ``"4G"``, ``"2GiB"`` (decimal K/M/G/T, binary KiB/MiB/GiB/TiB).
    Raises :class:`rewrite.errors.OptionError` naming ``flag``."""
    import re

    from rewrite.errors import OptionError
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise OptionError(f"{flag} {text!r}: give bytes or a size like 512M, 4G, 2GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 0:
        raise OptionError(f"{flag} must be >= 0, got {text!r}")
    return value


class CaptureStore:
    """Sample lists sharing one RAM budget of ``max_memory`` bytes (None = unbounded) and one temp folder.

    Use as a context manager; :meth:`samples` makes a new list. ``spilled`` tells whether anything went to disk.
    """

    def __init__(self, max_memory: int | None, parent: str | os.PathLike[str] | None = None) -> None:
        if max_memory is not None and (isinstance(max_memory, bool) or int(max_memory) < 0):
            from rewrite.errors import OptionError
            raise OptionError(f"--max-memory must be >= 0 bytes, got {max_memory!r}")
        self.max_memory = None if max_memory is None else int(max_memory)
        self.parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        self.folder: Path | None = None
        self.ram_bytes = 0
        self.disk_bytes = 0
        self.spilled = False
        self._lists: list[SampleList] = []

    def __enter__(self) -> "CaptureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def samples(self) -> "SampleList":
        lst = SampleList(self)
        self._lists.append(lst)
        return lst

    def _new_file(self) -> Path:
        if self.folder is None:
            from rewrite.atomic import clean_stale
            clean_stale(self.parent)
            self.folder = self.parent / f"{FOLDER_TAG}{os.getpid()}-{secrets.token_hex(4)}"
            self.folder.mkdir()
            log.info("capture spills to %s (over %s bytes in RAM)", self.folder, self.max_memory)
        return self.folder / f"{len(list(self.folder.iterdir()))}.bin"

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: budget, bytes in RAM and on disk (peak, over the run)."""
        return {"max_memory": self.max_memory, "ram_bytes": self.ram_bytes, "disk_bytes": self.disk_bytes,
                "spilled": self.spilled}

    def close(self) -> None:
        """Close every data file and remove the temporary folder."""
        for lst in self._lists:
            lst._close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class SampleList(Sequence):
    """A list of samples, each kept in RAM or on disk (see :class:`CaptureStore`). Indexing loads one sample."""

    def __init__(self, store: CaptureStore) -> None:
        self._store = store
        self._entries: list[Any] = []  # a list of tensors (RAM) or ("disk", [(offset, nbytes, dtype, shape)])
        self._path: Path | None = None
        self._writer: Any = None
        self._reader: Any = None
        self._size = 0
        self.on_disk = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, sample: Sequence[Any]) -> None:
        """Add one sample (a list of tensors); spills it to disk when the store's RAM budget would be exceeded."""
        nbytes = sum(t.numel() * t.element_size() for t in sample if isinstance(t, torch.Tensor))
        store = self._store
        if store.max_memory is None or store.ram_bytes + nbytes <= store.max_memory:
            store.ram_bytes += nbytes
            self._entries.append(list(sample))
            return
        if self._writer is None:
            self._path = store._new_file()
            self._writer = open(self._path, "ab")
        record = []
        for t in sample:
            if not isinstance(t, torch.Tensor):
                record.append(("value", t))
                continue
            flat = t.detach().contiguous().reshape(-1)
            raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
            self._writer.write(raw.tobytes())
            record.append(("tensor", self._size, raw.size, t.dtype, tuple(t.shape)))
            self._size += raw.size
        store.disk_bytes += nbytes
        store.spilled = True
        self.on_disk += 1
        self._entries.append(("disk", record))

    def __getitem__(self, index: int) -> list[Any]:  # type: ignore[override]
        entry = self._entries[index]
        if isinstance(entry, list):
            return entry
        if self._reader is None:
            self._writer.flush()
            self._reader = open(self._path, "rb")
        out: list[Any] = []
        for item in entry[1]:
            if item[0] == "value":
                out.append(item[1])
                continue
            _, offset, size, dtype, shape = item
            buf = bytearray(size)
            self._reader.seek(offset)
            if self._reader.readinto(buf) != size:
                raise OSError(f"{self._path}: captured sample truncated (the capture folder was modified)")
            out.append(torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape) if size
                       else torch.empty(shape, dtype=dtype))
        return out

    def __iter__(self) -> Iterator[list[Any]]:
        for i in range(len(self)):
            yield self[i]

    def _close(self) -> None:
        for f in (self._writer, self._reader):
            if f is not None:
                f.close()
        self._writer = self._reader = None
        self._entries = []


def evaluate(module: Any, samples: Sequence[Any]) -> dict[str, float]:
    """Site fidelity (cosine, rel_error, max_abs, mse) of ``module`` on ``samples``.

    In-RAM samples go to :func:`passes.transfer.fit.evaluate` unchanged; disk-backed ones are streamed: the sums
    r·c, ‖r‖², ‖c‖², ‖c−r‖² and max |c−r| are accumulated in float64 one sample at a time (same definitions as
    :func:`rewrite.metrics.fidelity`), so held-out evaluation does not hold every output at once.
    """
    from .fit import evaluate as in_memory
    if not (isinstance(samples, SampleList) and samples.on_disk):
        return in_memory(module, samples)
    dot = rr = cc = dd = 0.0
    max_abs = 0.0
    n = 0
    with torch.no_grad():
        for s in samples:
            c = module(*s[:-1]).reshape(-1).double()
            r = s[-1].reshape(-1).double()
            d = c - r
            dot += float(r @ c)
            rr += float(r @ r)
            cc += float(c @ c)
            dd += float(d @ d)
            max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
            n += r.numel()
    denom = math.sqrt(rr) * math.sqrt(cc)
    cos = dot / denom if denom > 0 else float(max_abs == 0)
    rel = math.sqrt(dd) / math.sqrt(rr) if rr > 0 else math.sqrt(cc)
    return {"cosine": cos, "rel_error": rel, "max_abs": max_abs, "mse": dd / n if n else 0.0}
