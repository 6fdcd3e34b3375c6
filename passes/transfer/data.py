"""Calibration data for attention transfer: named input batches for a loaded model, split into train / held-out.

Sources (:func:`load_calibration`):

- ``None`` (the default): **real text** whenever a tokenizer exists (the model folder's, or ``tokenizer=``): the
  ``offline`` corpus below (standard-library docstrings and installed packages' README/licence prose). Only when there is no tokenizer: synthetic inputs from the model's
  input spec (``HFModel.make_inputs`` for Hugging Face folders, :func:`rewrite.io.synth_inputs` for ONNX graphs,
  seeded noise shaped like the example inputs otherwise), with a logged warning and a ``warning`` entry in
  :meth:`Calibration.describe` saying that fidelity on real inputs is unmeasured;
- a ``.npz`` file: arrays keyed by the model's input names, batch on axis 0;
- a text file (any other suffix): one sample per line, tokenized with the model folder's tokenizer
  (``transformers.AutoTokenizer`` from ``HFModel.tokenizer_path``, local files only) or ``tokenizer=``;
- the string ``"offline"``: :func:`passes.transfer.corpus.offline_corpus` (the default text); ``"stdlib"``: the
  docstring corpus alone (:func:`passes.transfer.corpus.stdlib_corpus`);
- a list of strings (tokenized like a text file), a list of input dicts (used as batches), or a
  :class:`Calibration` (returned unchanged).

Every batch is a ``dict[str, np.ndarray]`` keyed by the model's input names, with the dtypes the model expects.
The split is deterministic: the last ``held_out`` fraction of the samples (in the given order) is held out.
:func:`stage2_batches` adds, for the default text only, further corpus lines for LoRA stage 2.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from rewrite.errors import SoftswapError
from rewrite.io import LoadedModel, synth_inputs

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


class CalibrationDataError(SoftswapError):
    """Calibration data could not be read or does not fit the model (names the file and what is wrong)."""


@dataclass
class Calibration:
    """Train and held-out batches of named model inputs (numpy), plus where they came from."""

    train: list[Batch]
    held_out: list[Batch]
    source: str
    samples: dict[str, int] = field(default_factory=dict)

    warning: str | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: source, batch counts, sample counts and (synthetic default only) a warning."""
        out = {"source": self.source, "train_batches": len(self.train), "held_out_batches": len(self.held_out),
               **self.samples}
        if self.warning:
            out["warning"] = self.warning
        return out


#: Report line when the default had to fall back to synthetic inputs (no tokenizer).
SYNTHETIC_WARNING = ("WARNING: calibrated and measured on SYNTHETIC token ids (no tokenizer found): fidelity on real "
                     "inputs is UNMEASURED; give --data (text/.npz/stdlib) or --tokenizer DIR")


# ------------------------------------------------------------------------------------------------------------
def _expected_dtypes(loaded: LoadedModel) -> dict[str, np.dtype]:
    """The numpy dtype of each model input (ONNX: declared type; FX: example input dtype)."""
    out: dict[str, np.dtype] = {}
    if loaded.kind == "onnx":
        from rewrite.io import _NP
        for value in loaded.onnx.graph.inputs:
            if not value.is_initializer() and value.dtype in _NP:
                out[value.name] = np.dtype(_NP[value.dtype])
    else:
        for name, ex in (loaded.example_inputs or {}).items():
            if isinstance(ex, torch.Tensor):
                out[name] = np.dtype(str(ex.dtype).replace("torch.", "")) if ex.dtype != torch.bfloat16 else np.dtype("float32")
            else:
                out[name] = np.asarray(ex).dtype
    return out


def conform(batch: Mapping[str, Any], loaded: LoadedModel, source: str) -> Batch:
    """Keep the model's inputs from ``batch`` (cast to the expected dtypes); error naming ``source`` if one lacks."""
    names = list(loaded.input_names)
    missing = [n for n in names if n not in batch]
    if missing:
        raise CalibrationDataError(f"{source}: calibration data lacks model input(s) {missing} "
                                   f"(has {sorted(batch)})")
    dtypes = _expected_dtypes(loaded)
    out: Batch = {}
    for n in names:
        value = batch[n]
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if n in dtypes and arr.dtype != dtypes[n]:
            arr = arr.astype(dtypes[n])
        out[n] = np.ascontiguousarray(arr)
    return out


def _split_batches(batches: list[Batch], held_out: float) -> tuple[list[Batch], list[Batch]]:
    if len(batches) < 2:
        raise CalibrationDataError("calibration data must give at least 2 batches (train and held-out); "
                                   f"got {len(batches)}: lower batch_size or give more samples")
    n_held = min(len(batches) - 1, max(1, int(round(held_out * len(batches)))))
    return batches[:-n_held], batches[-n_held:]


def _rows(arrays: Mapping[str, np.ndarray], start: int, stop: int) -> Batch:
    return {k: v[start:stop] for k, v in arrays.items()}


# ------------------------------------------------------------------------------------------------------------
def _from_npz(path: Path, loaded: LoadedModel, batch_size: int, held_out: float) -> Calibration:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError ...
        raise CalibrationDataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    arrays = conform(arrays, loaded, str(path))
    sizes = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise CalibrationDataError(f"{path}: arrays must share a non-empty batch axis 0; got {sizes}")
    n = next(iter(sizes.values()))
    batches = [_rows(arrays, i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    train, held = _split_batches(batches, held_out)
    return Calibration(train, held, str(path), {"samples": n})


def _tokenizer_for(loaded: LoadedModel, tokenizer: Any, source: str) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = tokenizer
    if path is None:
        hf = loaded.extra.get("hf")
        path = getattr(hf, "tokenizer_path", None)
    if path is None:
        raise CalibrationDataError(f"{source}: text calibration data needs a tokenizer, and {loaded.source} has "
                                   "none (use a Hugging Face model folder, pass tokenizer=, or give a .npz file)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise CalibrationDataError(f"{path}: cannot load a tokenizer ({exc})") from None


def has_tokenizer(loaded: LoadedModel, tokenizer: Any = None) -> bool:
    """True when text can be tokenized for ``loaded``: ``tokenizer`` is given or the model folder ships one."""
    if tokenizer is not None:
        return True
    return getattr(loaded.extra.get("hf"), "tokenizer_path", None) is not None


def tokenize_lines(lines: Sequence[str], loaded: LoadedModel, *, tokenizer: Any = None, batch_size: int = 16,
                   max_length: int = 128, source: str = "<lines>", sort_by_length: bool = True) -> list[Batch]:
    """Tokenize ``lines`` into padded batches of model inputs.

    With ``sort_by_length`` the lines are ordered by token count first (stable, so deterministic), which keeps
    padding small; each batch is padded to its longest line and truncated at ``max_length`` tokens.
    """
    tok = _tokenizer_for(loaded, tokenizer, source)
    lines = [s for s in (l.strip() for l in lines) if s]
    if not lines:
        raise CalibrationDataError(f"{source}: no non-empty lines")
    if sort_by_length:
        lengths = [len(ids) for ids in tok(lines, truncation=True, max_length=max_length)["input_ids"]]
        lines = [lines[i] for i in sorted(range(len(lines)), key=lambda i: (lengths[i], i))]
    batches = []
    for i in range(0, len(lines), batch_size):
        enc = tok(lines[i:i + batch_size], padding="longest", truncation=True, max_length=max_length,
                  return_tensors="np")
        batches.append(conform(dict(enc), loaded, source))
    return batches


def _from_lines(lines: Sequence[str], loaded: LoadedModel, source: str, *, tokenizer: Any, batch_size: int,
                max_length: int, max_samples: int | None, held_out: float) -> Calibration:
    lines = [s for s in (l.strip() for l in lines) if s]
    if max_samples:
        lines = lines[:max_samples]
    if len(lines) < 2:
        raise CalibrationDataError(f"{source}: need at least 2 non-empty lines, found {len(lines)}")
    n_held = min(len(lines) - 1, max(1, int(round(held_out * len(lines)))))
    train_lines, held_lines = lines[:-n_held], lines[-n_held:]
    train = tokenize_lines(train_lines, loaded, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                           source=source)
    held = tokenize_lines(held_lines, loaded, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                          source=source)
    return Calibration(train, held, source, {"train_samples": len(train_lines), "held_out_samples": len(held_lines)})


def synthetic_batches(loaded: LoadedModel, n_batches: int, batch_size: int, seq: int | None, seed: int) -> list[Batch]:
    """``n_batches`` synthetic input batches from the model's input spec (seeded; batch ``i`` uses ``seed + i``)."""
    hf = loaded.extra.get("hf")
    out = []
    for i in range(n_batches):
        if hf is not None and hasattr(hf, "make_inputs"):
            batch = hf.make_inputs(batch_size, seq, seed=seed + 1 + i)
        elif loaded.kind == "onnx":
            batch = synth_inputs(loaded, batch=batch_size, seq=seq or 16, seed=seed + 1 + i)
        else:
            gen = torch.Generator().manual_seed(seed + 1 + i)
            batch = {}
            for name, ex in (loaded.example_inputs or {}).items():
                if isinstance(ex, torch.Tensor) and ex.is_floating_point():
                    batch[name] = torch.randn(ex.shape, generator=gen, dtype=ex.dtype)
                else:
                    batch[name] = ex  # integer / bool inputs are reused as given
        out.append(conform(batch, loaded, "<synthetic>"))
    return out


def load_calibration(loaded: LoadedModel, data: Any = None, *, batch_size: int = 16, max_length: int = 128,
                     max_samples: int | None = 512, held_out: float = 0.2, seq: int | None = None,
                     n_batches: int = 10, tokenizer: Any = None, seed: int = 0) -> Calibration:
    """Calibration batches for ``loaded`` from ``data`` (see the module docstring for the accepted sources).

    ``batch_size``: samples per batch; ``max_length``: token truncation for text; ``max_samples``: cap on text
    lines; ``held_out``: fraction held out (at least one batch); ``seq``/``n_batches``: synthetic input shape and
    count. Raises :class:`CalibrationDataError` naming the file when the data cannot be read or lacks an input.
    """
    if isinstance(data, Calibration):
        return data
    if data is None:
        if has_tokenizer(loaded, tokenizer):
            calib = load_calibration(loaded, "offline", batch_size=batch_size, max_length=max_length,
                                     max_samples=max_samples, held_out=held_out, tokenizer=tokenizer, seed=seed)
            calib.source = f"default real text: {calib.source}"
            log.info("no calibration data given: using real text (%s)", calib.source)
            return calib
        batches = synthetic_batches(loaded, n_batches, batch_size, seq, seed)
        train, held = _split_batches(batches, held_out)
        log.warning("%s: %s", loaded.source, SYNTHETIC_WARNING)
        return Calibration(train, held, f"synthetic ids -- {SYNTHETIC_WARNING}", {"samples": n_batches * batch_size},
                           warning=SYNTHETIC_WARNING)
    if isinstance(data, str) and data in ("stdlib", "offline"):
        corpus = _real_text_corpus(data)
        label = f"stdlib docstrings ({corpus.source})" if data == "stdlib" else f"offline text ({corpus.source})"
        return _from_lines(list(corpus.calibration), loaded, label,
                           tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                           max_samples=max_samples, held_out=held_out)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise CalibrationDataError(f"{path}: calibration data file not found")
        if path.suffix == ".npz":
            return _from_npz(path, loaded, batch_size, held_out)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationDataError(f"{path}: cannot read as UTF-8 text lines ({exc})") from None
        if "\x00" in text:
            raise CalibrationDataError(f"{path}: binary file; expected a .npz file or UTF-8 text lines")
        return _from_lines(text.splitlines(), loaded, str(path), tokenizer=tokenizer, batch_size=batch_size,
                           max_length=max_length, max_samples=max_samples, held_out=held_out)
    if isinstance(data, Sequence) and data and all(isinstance(s, str) for s in data):
        return _from_lines(list(data), loaded, "<lines>", tokenizer=tokenizer, batch_size=batch_size,
                           max_length=max_length, max_samples=max_samples, held_out=held_out)
    if isinstance(data, Sequence) and data and all(isinstance(b, Mapping) for b in data):
        batches = [conform(b, loaded, "<batches>") for b in data]
        train, held = _split_batches(batches, held_out)
        return Calibration(train, held, "<batches>", {"batches": len(batches)})
    raise CalibrationDataError(f"calibration data of type {type(data).__name__} not understood: give a .npz file, "
                               "a text file, 'offline', 'stdlib', a list of strings or a list of input dicts")


# ------------------------------------------------------------------------------------------------------------
#: Default stage-2 text (issue 15): this many further corpus lines beyond the stage-1 calibration lines, so the
#: end-to-end fine-tune sees ~3.5x more distinct sentences than the 819 it would otherwise repeat for ~12 epochs.
STAGE2_EXTRA_LINES = 2048
#: Consecutive extra lines joined into samples of up to this many tokens, ``STAGE2_PACKED_BATCH`` samples per batch
#: (0 = one line per sample, batched like the calibration). Measured worse than single lines at equal steps and
#: 35 % slower per step (docs/transfer.md, "Fourth pass"), so off by default; kept as an option.
STAGE2_PACK_TOKENS = 0
STAGE2_PACKED_BATCH = 8


def pack_lines(lines: Sequence[str], lengths: Sequence[int], max_tokens: int, seed: int = 0) -> list[str]:
    """Join consecutive ``lines`` (``lengths``: their token counts without special tokens) into samples whose token
    count first reaches a target drawn uniformly from [max_tokens / 2, max_tokens] (seeded: deterministic); every
    line is used once, in order. A line longer than the target is a sample of its own."""
    if max_tokens < 2:
        raise CalibrationDataError(f"pack_lines: max_tokens must be >= 2 (got {max_tokens})")
    rng = np.random.default_rng(seed)
    out: list[str] = []
    cur: list[str] = []
    n = 0
    target = int(rng.integers(max_tokens // 2, max_tokens + 1))
    for line, length in zip(lines, lengths):
        cur.append(line)
        n += int(length)
        if n >= target:
            out.append(" ".join(cur))
            cur, n = [], 0
            target = int(rng.integers(max_tokens // 2, max_tokens + 1))
    if cur:
        out.append(" ".join(cur))
    return out


def _real_text_corpus(name: str):
    """The ``"stdlib"`` or ``"offline"`` corpus, from the per-machine file cache (:mod:`.corpus_cache`): built once
    per machine, not per run, rank or stage."""
    from .corpus import offline_corpus, stdlib_corpus
    from .corpus_cache import cached_corpus
    return cached_corpus(name, stdlib_corpus if name == "stdlib" else offline_corpus)


def stage2_batches(loaded: LoadedModel, data: Any, calib: Calibration, *, tokenizer: Any = None,
                   max_samples: int | None = 1024, max_length: int = 128, extra_lines: int = STAGE2_EXTRA_LINES,
                   pack_tokens: int = STAGE2_PACK_TOKENS, packed_batch: int = STAGE2_PACKED_BATCH) -> list[Batch]:
    """Training batches of LoRA stage 2 (:mod:`.stage2`): ``calib.train``, plus for the default real text (``data``
    None with a tokenizer, ``"offline"``, ``"stdlib"``) ``extra_lines`` further corpus lines — the lines after the
    first ``max_samples`` (never in the stage-1 calibration, its held-out split or the corpus's held-out split) —
    packed into samples of up to ``pack_tokens`` tokens (``packed_batch`` per batch; ``pack_tokens`` 0: one line
    per sample, batched like ``calib.train``). Any other data: ``calib.train`` unchanged. Deterministic."""
    if calib.warning or (data is not None and not (isinstance(data, str) and data in ("offline", "stdlib"))):
        return list(calib.train)
    if data is None and not has_tokenizer(loaded, tokenizer):
        return list(calib.train)
    if extra_lines <= 0 or not max_samples:
        return list(calib.train)
    corpus = _real_text_corpus("stdlib" if data == "stdlib" else "offline")
    lines = [s for s in (l.strip() for l in corpus.calibration[max_samples:max_samples + extra_lines]) if s]
    if not lines:
        return list(calib.train)
    size = calib.train[0][next(iter(calib.train[0]))].shape[0] if calib.train else 16
    if pack_tokens:
        tok = _tokenizer_for(loaded, tokenizer, "stage-2 text")
        lengths = [len(ids) - 2 for ids in tok(lines)["input_ids"]]
        lines, size = pack_lines(lines, lengths, pack_tokens), packed_batch
        max_length = max(max_length, pack_tokens + 2)
    extra = tokenize_lines(lines, loaded, tokenizer=tokenizer, batch_size=size, max_length=max_length,
                           source="stage-2 text")
    return list(calib.train) + extra
