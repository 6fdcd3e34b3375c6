"""Fitting data for passes that learn from examples (classifier heads, OOD detectors): one ``.npz`` file.

Contract of the file (``softswap convert ... --fit DATA``):

- the model's inputs, keyed by input name; ``x`` is accepted for a model with a single input;
- ``y``: integer class labels, shape (N,), values in ``0..K-1`` (K = the head's number of classes, checked by the
  pass that knows K);
- ``x_ood`` (optional): out-of-distribution samples for a single-input model (``<name>_ood`` for a named input),
  same trailing shape as the input.

Every problem is a :class:`FitDataError` naming the file and the array at fault; nothing is ever written by this
module. Arrays are read without pickles (``allow_pickle=False``): a data file cannot run code.
"""
from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import SoftswapError

log = logging.getLogger(__name__)


class FitDataError(SoftswapError):
    """The fitting data cannot be used: missing or malformed arrays, labels out of range, shapes that do not fit."""


@dataclass
class FitData:
    """Named model inputs (N samples each), integer labels ``y`` (N,), optional OOD inputs, and where they came from.

    ``inputs`` and ``ood`` map model input names to arrays whose first axis is the sample axis.
    """

    inputs: dict[str, np.ndarray]
    y: np.ndarray
    ood: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "<arrays>"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes_seen(self) -> int:
        return int(self.y.max()) + 1 if len(self) else 0

    def subset(self, index: np.ndarray) -> "FitData":
        """The samples at ``index`` (OOD samples are kept whole)."""
        return FitData({k: v[index] for k, v in self.inputs.items()}, self.y[index], dict(self.ood), self.source)

    def split(self, held_out: float = 0.2, seed: int = 0) -> tuple["FitData", "FitData"]:
        """(fit part, held-out part), stratified by label so every class is in both where it has ≥ 2 samples.
        ``held_out`` is the fraction of samples held out (0 < held_out < 1)."""
        if not 0.0 < held_out < 1.0:
            raise FitDataError(f"held-out fraction {held_out} must lie strictly between 0 and 1")
        rng = np.random.default_rng(seed)
        fit_idx, test_idx = [], []
        for label in np.unique(self.y):
            members = np.flatnonzero(self.y == label)
            rng.shuffle(members)
            n_test = int(round(len(members) * held_out)) if len(members) >= 2 else 0
            n_test = min(max(n_test, 1 if len(members) >= 2 else 0), len(members) - 1)
            test_idx.append(members[:n_test])
            fit_idx.append(members[n_test:])
        fit = np.sort(np.concatenate(fit_idx))
        test = np.sort(np.concatenate(test_idx))
        if len(test) == 0:
            raise FitDataError(f"{self.source}: too few samples ({len(self)}) to hold any out")
        return self.subset(fit), self.subset(test)

    def batches(self, batch: int, which: str = "inputs") -> "Any":
        """Yield dicts of ``batch`` samples of ``inputs`` (or ``ood``) in order."""
        arrays = self.inputs if which == "inputs" else self.ood
        n = next(iter(arrays.values())).shape[0] if arrays else 0
        for start in range(0, n, batch):
            yield {k: v[start:start + batch] for k, v in arrays.items()}


def _as_int_labels(y: np.ndarray, source: str) -> np.ndarray:
    if y.ndim != 1:
        raise FitDataError(f"{source}: labels 'y' must be one integer per sample (shape (N,)), got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise FitDataError(f"{source}: labels 'y' must be integers (class ids), got non-integer floats")
    elif y.dtype.kind not in "iub":
        raise FitDataError(f"{source}: labels 'y' must be integers (class ids), got dtype {y.dtype}")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise FitDataError(f"{source}: labels 'y' must be class ids >= 0, found {int(y.min())}")
    return y


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FitDataError(f"{path}: fitting data file not found")
    if path.is_dir():
        raise FitDataError(f"{path}: fitting data must be an .npz file, got a folder")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: np.asarray(archive[name]) for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise FitDataError(f"{path}: not a readable .npz archive of arrays ({exc})") from None


def load_fit_data(data: "str | os.PathLike[str] | Mapping[str, Any] | FitData", input_names: Sequence[str],
                  input_shapes: Mapping[str, Sequence[Any]] | None = None, need_labels: bool = True) -> FitData:
    """Read and check fitting data for a model with ``input_names``.

    ``data``: an ``.npz`` path, a mapping of arrays with the same keys, or a :class:`FitData` (re-checked).
    ``input_shapes``: the model's input shapes (ints fixed, anything else free; the first axis is the batch);
    a sample whose trailing shape differs from a fixed dim is an error naming the array. Raises
    :class:`FitDataError` for a missing input or ``y``, unequal sample counts, non-integer or negative labels.
    """
    if isinstance(data, FitData):
        arrays = {**data.inputs, "y": data.y, **{f"{k}_ood": v for k, v in data.ood.items()}}
        source = data.source
    elif isinstance(data, Mapping):
        arrays, source = {k: np.asarray(v) for k, v in data.items()}, "<arrays>"
    else:
        path = Path(data)
        arrays, source = _read_npz(path), str(path)
    names = list(input_names)
    inputs: dict[str, np.ndarray] = {}
    ood: dict[str, np.ndarray] = {}
    for name in names:
        key = name if name in arrays else ("x" if len(names) == 1 and "x" in arrays else None)
        if key is None:
            hint = " (or 'x' for a single-input model)" if len(names) == 1 else ""
            raise FitDataError(f"{source}: no array for model input {name!r}{hint}; the file has "
                               f"{sorted(arrays) or 'no arrays'}")
        inputs[name] = arrays[key]
        ood_key = next((k for k in (f"{name}_ood", "x_ood" if len(names) == 1 else None) if k and k in arrays), None)
        if ood_key is not None:
            ood[name] = arrays[ood_key]
    if "y" in arrays:
        y = _as_int_labels(arrays["y"], source)
    elif need_labels:
        raise FitDataError(f"{source}: no labels: the file needs an integer array 'y' (one class id per sample)")
    else:
        y = np.zeros(next(iter(inputs.values())).shape[0], dtype=np.int64)
    for group, what in ((inputs, "samples"), (ood, "OOD samples")):
        counts = {k: (v.shape[0] if v.ndim else 0) for k, v in group.items()}
        if group and len(set(counts.values())) > 1:
            raise FitDataError(f"{source}: inputs disagree on the number of {what}: {counts}")
    n = next(iter(inputs.values())).shape[0] if inputs and next(iter(inputs.values())).ndim else 0
    if n == 0:
        raise FitDataError(f"{source}: no samples (the inputs are empty or scalars)")
    if len(y) != n:
        raise FitDataError(f"{source}: 'y' has {len(y)} labels but the inputs have {n} samples")
    for name, shape in (input_shapes or {}).items():
        for group, label in ((inputs, ""), (ood, " (OOD)")):
            if name not in group or shape is None:
                continue
            got = group[name].shape
            if len(got) != len(shape):
                raise FitDataError(f"{source}: input {name!r}{label} has rank {len(got)} (shape {got}); the model "
                                   f"takes rank {len(shape)} ({_shape_text(shape)})")
            for axis, (want, have) in enumerate(zip(shape, got)):
                if axis > 0 and isinstance(want, int) and want != have:
                    raise FitDataError(f"{source}: input {name!r}{label} has shape {got}; the model takes "
                                       f"{_shape_text(shape)} (axis {axis} differs)")
    for group in (inputs, ood):
        for name, arr in group.items():
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise FitDataError(f"{source}: input {name!r} holds NaN or infinite values")
    return FitData(inputs, y, ood, source)


def check_labels(data: FitData, num_classes: int, what: str = "the head") -> None:
    """Labels must lie in ``0..num_classes-1`` and every class must have at least one sample."""
    if len(data) and int(data.y.max()) >= num_classes:
        raise FitDataError(f"{data.source}: label {int(data.y.max())} is out of range: {what} has {num_classes} "
                           f"classes (labels 0..{num_classes - 1})")
    missing = sorted(set(range(num_classes)) - set(np.unique(data.y).tolist()))
    if missing:
        raise FitDataError(f"{data.source}: classes {missing[:10]}{'…' if len(missing) > 10 else ''} have no "
                           f"samples; every class of {what} ({num_classes}) needs at least one")


def _shape_text(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + ")"
