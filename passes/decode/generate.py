"""Greedy generation with the decode graphs of :func:`passes.decode.export_decode` in onnxruntime.

The prompt runs once through ``prefill.onnx``; every new token runs ``step.onnx`` with the state returned by the
previous call, so each token costs the same whatever the context length."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rewrite.errors import SoftswapError

log = logging.getLogger(__name__)


class GenerateError(SoftswapError):
    """A decode folder that cannot be used, or a bad prompt / option (one line, exit 2)."""


@dataclass
class Generated:
    """New token ids, and (``keep_logits``) the logits each token was chosen from: (vocab,) per token."""

    tokens: list[int]
    logits: list[np.ndarray] = field(default_factory=list)


class DecodeSession:
    """The prefill and step graphs of a decode folder in onnxruntime (``threads`` intra-op threads; 0 = default);
    with ``step_library`` (a ``softswap compile`` artefact of ``step.onnx``) the step runs in TVM instead."""

    def __init__(self, folder: str | os.PathLike[str], threads: int = 0,
                 step_library: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder)
        mpath = self.folder / "decode.json"
        if not mpath.is_file():
            raise GenerateError(f"{self.folder}: not a decode folder (no decode.json; write one with "
                                "`softswap convert MODEL -o DIR --attention linear --decode`)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise GenerateError(f"{mpath}: cannot read the manifest ({exc})") from None
        if not str(self.manifest.get("format", "")).startswith("softswap-decode/"):
            raise GenerateError(f"{mpath}: unknown manifest format {self.manifest.get('format')!r}")
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        for g in ("prefill", "step"):
            path = self.folder / self.manifest["graphs"][g]
            if not path.is_file():
                raise GenerateError(f"{path}: missing {g} graph")
            try:
                self.sessions[g] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime's own exception types
                raise GenerateError(f"{path}: onnxruntime cannot load the {g} graph ({str(exc).splitlines()[0]})") \
                    from None
        self.state_names = [s["name"] for s in self.manifest["state"]]
        self.step_runner = None
        if step_library is not None:
            from targets import Runner  # TVM artefacts
            self.step_runner = Runner(step_library)
            want = self.manifest["inputs"]["step"]
            if self.step_runner.input_names != want:
                raise GenerateError(f"{step_library}: inputs {self.step_runner.input_names} are not those of "
                                    f"{self.folder / 'step.onnx'} ({want}); compile that step graph")

    def zero_state(self, batch: int) -> list[np.ndarray]:
        """The state before any token (all zeros), shapes from the manifest."""
        return [np.zeros((batch, *s["shape"][1:]), dtype=np.float32) for s in self.manifest["state"]]

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, N) int64 → (logits (B, N, vocab), states). One token (the prefill graph takes N ≥ 2) is a step
        from the zero state at position 0: the same sums."""
        if ids.shape[1] == 1:
            return self.step(ids, 0, self.zero_state(ids.shape[0]))
        pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        out = self.sessions["prefill"].run(None, {"input_ids": ids, "positions": pos})
        return out[0], out[1:]

    def step(self, ids: np.ndarray, position: int, states: Sequence[np.ndarray]
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, 1) at ``position`` (0-based) + states → (logits (B, 1, vocab), new states)."""
        feeds = {"input_ids": ids, "positions": np.full(ids.shape, position, dtype=np.int64)}
        feeds.update(zip(self.state_names, states))
        if self.step_runner is not None:
            res = self.step_runner.run(feeds)
            out = [np.asarray(res[n]) for n in self.manifest["outputs"]["step"]]
        else:
            out = self.sessions["step"].run(None, feeds)
        return out[0], out[1:]


def generate(folder: str | os.PathLike[str] | DecodeSession, prompt_ids: Sequence[int], max_new_tokens: int, *,
             stop_at_eos: bool = True, keep_logits: bool = False, threads: int = 0) -> Generated:
    """Greedy decoding: the ``max_new_tokens`` ids following ``prompt_ids`` (fewer when eos is produced and
    ``stop_at_eos``; the eos id is included). Raises :class:`GenerateError` for a bad folder or prompt."""
    sess = folder if isinstance(folder, DecodeSession) else DecodeSession(folder, threads)
    m = sess.manifest
    vocab = int(m["vocab_size"])
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise GenerateError("--prompt-ids: the prompt is empty (give at least one token id)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise GenerateError(f"--prompt-ids: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
    if max_new_tokens < 0:
        raise GenerateError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    limit = m.get("max_positions")
    if limit and len(ids) + max_new_tokens - 1 > int(limit):
        raise GenerateError(f"--max-new-tokens {max_new_tokens}: prompt ({len(ids)}) + new tokens exceed the "
                            f"model's {limit} positions")
    out = Generated([])
    if max_new_tokens == 0:
        return out
    eos = m.get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    logits, states = sess.prefill(np.asarray([ids], dtype=np.int64))
    last = logits[0, -1]
    pos = len(ids)
    while True:
        tok = int(np.argmax(last))
        out.tokens.append(tok)
        if keep_logits:
            out.logits.append(last.copy())
        if len(out.tokens) >= max_new_tokens or (stop_at_eos and tok in eos_ids):
            return out
        logits, states = sess.step(np.asarray([[tok]], dtype=np.int64), pos, states)
        last = logits[0, 0]
        pos += 1
