"""Family adapters: walk a Hugging Face causal LM's own submodules (embeddings, blocks, MLPs, norms, LM head) and
call a :class:`~passes.decode.state.LinearLayerState` where the model calls attention.

An adapter exposes ``embed(input_ids, positions)`` → (hidden (B, N, C), context passed to every layer),
``qkv(i, x, context)`` → q (B, H, N, D), k, v (B, Hkv, N, D) of layer i from its normalised input, and
``block(i, hidden, attend, context)`` → hidden after layer i, with ``attend(q, k, v)`` returning (B, H, N, D);
``head(hidden)`` → logits (B, N, vocab). Positions are explicit (absolute GPT-2 embeddings, RoPE for Llama-style
models applied to q and k before φ), so the same code serves the prompt and the step.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from rewrite.errors import UnsupportedModelError

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Gpt2Adapter(nn.Module):
    """GPT-2 (``GPT2LMHeadModel``): learned absolute position embeddings ``wpe``."""

    family = "gpt2"

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        cfg = lm.config
        if getattr(cfg, "add_cross_attention", False):
            raise UnsupportedModelError("decode export: GPT-2 with cross-attention is not a decoder-only LM")
        self.tf, self.lm_head = lm.transformer, lm.lm_head
        self.heads = self.kv_heads = int(cfg.n_head)
        self.head_dim = int(cfg.n_embd) // self.heads
        self.layers = len(self.tf.h)
        self.max_positions = int(cfg.n_positions)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.tf.wte(input_ids) + self.tf.wpe(positions), None

    def block(self, i: int, h: torch.Tensor, attend: Attend, context: Any) -> torch.Tensor:
        blk = self.tf.h[i]
        b, n, c = h.shape
        q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(c, dim=2)
        q, k, v = (x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2) for x in (q, k, v))
        y = attend(q, k, v).transpose(1, 2).reshape(b, n, c)
        h = h + blk.attn.c_proj(y)
        return h + blk.mlp(blk.ln_2(h))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.tf.ln_f(h))


class LlamaAdapter(nn.Module):
    """Llama-style (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``): RMSNorm, rotary position
    embedding from the model's own ``rotary_emb`` applied with its module's ``apply_rotary_pos_emb``, GQA."""

    family = "llama"

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        cfg = lm.config
        self.base, self.lm_head = lm.model, lm.lm_head
        attn = self.base.layers[0].self_attn
        self.heads, self.kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        self.head_dim = int(attn.head_dim)
        self.layers = len(self.base.layers)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        self._rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Any]:
        h = self.base.embed_tokens(input_ids)
        return h, self.base.rotary_emb(h, positions)

    def block(self, i: int, h: torch.Tensor, attend: Attend, context: Any) -> torch.Tensor:
        layer = self.base.layers[i]
        a = layer.self_attn
        b, n, _ = h.shape
        x = layer.input_layernorm(h)
        q = a.q_proj(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = a.k_proj(x).reshape(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = a.v_proj(x).reshape(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = context
        q, k = self._rope(q, k, cos, sin)
        y = attend(q, k, v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        h = h + a.o_proj(y)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.base.norm(h))


#: model_type → adapter class.
FAMILIES: dict[str, type[nn.Module]] = {"gpt2": Gpt2Adapter, "llama": LlamaAdapter, "mistral": LlamaAdapter,
                                        "qwen2": LlamaAdapter}


def adapter_for(lm: nn.Module, source: str) -> nn.Module:
    """The adapter of ``lm``'s family. Raises :class:`UnsupportedModelError` (one line naming ``source``) for a
    model without a causal LM head or of an unsupported family."""
    cfg = getattr(lm, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        raise UnsupportedModelError(f"{source}: decode export supports the families {', '.join(sorted(FAMILIES))}; "
                                    f"this model is {kind or type(lm).__name__!s}")
    if getattr(cfg, "is_encoder_decoder", False) or not hasattr(lm, "lm_head"):
        raise UnsupportedModelError(f"{source}: decode export needs a causal LM with an LM head (e.g. "
                                    f"GPT2LMHeadModel, LlamaForCausalLM); got {type(lm).__name__}")
    return FAMILIES[kind](lm)
