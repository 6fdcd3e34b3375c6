"""The two exported modules: prefill (prompt → logits + every layer's state) and step (one token + state → logits
+ new state). Inputs and outputs are flat tensors, named by :func:`io_names`: ``input_ids`` (B, N) int64,
``positions`` (B, N) int64, ``logits`` (B, N, vocab), and per layer the state inputs ``state.{i}.S`` (B, Hs, F, E)
and ``state.{i}.z`` (B, Hs, F, 1) (MALA also ``state.{i}.v`` (B, Hs, 1, E) and ``state.{i}.n`` (B, Hs, 1, 1)) and
with the hybrid window (W) also ``state.{i}.win_k`` (B, Hkv, W, D), ``state.{i}.win_v`` (B, Hkv, W, E) and
``state.{i}.win_m`` (B, 1, W, 1); the state outputs ``next_state.{i}.S`` / ``next_state.{i}.z`` … (same shapes;
ONNX forbids one name for an input and an output). Feed a graph's ``next_state.*`` to the next step's ``state.*``."""
from __future__ import annotations

import torch
from torch import nn

from .state import LinearLayerState


def state_names(layers: int, parts: tuple[str, ...] = ("S", "z"), prefix: str = "state") -> list[str]:
    """``state.0.S, state.0.z, state.1.S, …`` (``prefix`` ``next_state`` for the outputs)."""
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in parts]


def io_names(layers: int, parts: tuple[str, ...] = ("S", "z")) -> dict[str, tuple[list[str], list[str]]]:
    """Input and output names of the ``prefill`` and ``step`` graphs."""
    states, nxt = state_names(layers, parts), state_names(layers, parts, "next_state")
    return {"prefill": (["input_ids", "positions"], ["logits", *nxt]),
            "step": (["input_ids", "positions", *states], ["logits", *nxt])}


class PrefillGraph(nn.Module):
    """forward(input_ids, positions) → (logits, S_0, z_0, S_1, z_1, …)."""

    def __init__(self, adapter: nn.Module, layers: list[LinearLayerState]) -> None:
        super().__init__()
        self.adapter, self.attn = adapter, nn.ModuleList(layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, ctx = self.adapter.embed(input_ids, positions)
        states: list[torch.Tensor] = []
        for i, layer in enumerate(self.attn):
            def attend(q, k, v, layer=layer):
                y, *state = layer.prompt(q, k, v)
                states.extend(state)
                return y
            h = self.adapter.block(i, h, attend, ctx)
        return (self.adapter.head(h), *states)


class StepGraph(nn.Module):
    """forward(input_ids (B, 1), positions (B, 1), S_0, z_0, …) → (logits (B, 1, vocab), S_0', z_0', …) (each
    layer's state parts in :data:`~passes.decode.state.STATE_PARTS` order)."""

    def __init__(self, adapter: nn.Module, layers: list[LinearLayerState]) -> None:
        super().__init__()
        self.adapter, self.attn = adapter, nn.ModuleList(layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *states: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        h, ctx = self.adapter.embed(input_ids, positions)
        new: list[torch.Tensor] = []
        at = 0
        for i, layer in enumerate(self.attn):
            n = len(layer.parts)

            def attend(q, k, v, layer=layer, mine=states[at:at + n]):
                y, *state = layer.step(q, k, v, *mine)
                new.extend(state)
                return y
            at += n
            h = self.adapter.block(i, h, attend, ctx)
        return (self.adapter.head(h), *new)
