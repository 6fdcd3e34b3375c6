"""The original softmax model's one-token decode step with a KV cache, as an ONNX graph (for comparisons).

``kv_step.onnx``: ``input_ids`` (B, 1) int64, ``positions`` (B, 1) int64, ``past.{i}.k`` / ``past.{i}.v``
(B, Hkv, T, D) for every layer i (T dynamic, ≥ 1) → ``logits`` (B, 1, vocab), ``present.{i}.k`` /
``present.{i}.v`` (B, Hkv, T + 1, D): the past with the token's keys/values appended, as Hugging Face's cache and
the usual exported decoder graphs return it.

The step walks the model's own modules through its family adapter (:mod:`passes.decode.families`, the same walk as
the linear step graph) and attends with exact softmax over the T + 1 cached keys (query heads of a group read
their KV head, as ``repeat_kv``). It is the unconverted model: the cost of softmax decoding grows with T, which is
what the linear step graph is compared against (tools/bench/generate.py).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .export import _export_onnx, _load, check_output_folder
from .families import adapter_for

log = logging.getLogger(__name__)


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the KV-cache step graph."""
    past = [f"past.{i}.{p}" for i in range(layers) for p in ("k", "v")]
    present = [f"present.{i}.{p}" for i in range(layers) for p in ("k", "v")]
    return ["input_ids", "positions", *past], ["logits", *present]


def _softmax_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """softmax(q kᵀ / √D) v for one query per head: q (B, H, 1, D), k/v (B, Hkv, T, D) → (B, H, 1, D). The query
    heads of a KV head are stacked as rows against the un-expanded keys (the same numbers as repeating k/v)."""
    b, h, _, d = q.shape
    qg = q.reshape(b, h // groups, groups, d)
    w = torch.softmax((qg @ k.transpose(-1, -2)) * d ** -0.5, dim=-1)  # (B, Hkv, G, T)
    return (w @ v).reshape(b, h, 1, v.shape[-1])


class KvStepGraph(nn.Module):
    """forward(input_ids (B, 1), positions (B, 1), past_k_0, past_v_0, …) → (logits, present_k_0, present_v_0, …)."""

    def __init__(self, adapter: nn.Module) -> None:
        super().__init__()
        self.adapter = adapter
        self.groups = adapter.heads // adapter.kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *past: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        h, ctx = self.adapter.embed(input_ids, positions)
        present: list[torch.Tensor] = []
        for i in range(self.adapter.layers):
            def attend(q, k, v, pk=past[2 * i], pv=past[2 * i + 1]):
                kk, vv = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                present.extend((kk, vv))
                return _softmax_one_query(q, kk, vv, self.groups)
            h = self.adapter.block(i, h, attend, ctx)
        return (self.adapter.head(h), *present)


def export_kv_step(model: Any, out_dir: str | os.PathLike[str], *, trust_remote_code: bool | None = None
                   ) -> dict[str, Any]:
    """Write ``OUT_DIR/kv_step.onnx`` for an (unconverted) causal LM of a supported family. Returns a small
    manifest: layers, kv_heads, head_dim, vocab_size, names. Raises the errors of :func:`export_decode`."""
    out = check_output_folder(out_dir)
    loaded = _load(model, trust_remote_code)
    lm = loaded.extra["hf"].module.model
    adapter = adapter_for(lm, loaded.source).eval()
    graph = KvStepGraph(adapter).eval()
    from torch.export import Dim
    batch = Dim("batch", min=1, max=1024)
    past_len = Dim("past", min=2, max=max(3, adapter.max_positions or 1 << 20))
    g = torch.Generator().manual_seed(0)
    past = [torch.randn(2, adapter.kv_heads, 5, adapter.head_dim, generator=g) for _ in range(2 * adapter.layers)]
    ids = torch.randint(0, int(lm.config.vocab_size), (2, 1), generator=g)
    pos = torch.full((2, 1), 5)
    names = kv_names(adapter.layers)
    out.mkdir(exist_ok=True)
    _export_onnx(graph, (ids, pos, *past), ({0: batch}, {0: batch}, tuple({0: batch, 2: past_len} for _ in past)),
                 names, out / "kv_step.onnx", "KV-cache step", loaded.source)
    log.info("KV-cache step graph: %s → %s", loaded.source, out / "kv_step.onnx")
    return {"layers": adapter.layers, "kv_heads": adapter.kv_heads, "head_dim": adapter.head_dim,
            "vocab_size": int(lm.config.vocab_size), "inputs": names[0], "outputs": names[1],
            "path": str(Path(out) / "kv_step.onnx")}
