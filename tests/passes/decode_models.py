"""Causal LMs and references shared by the decode tests (test_decode_export, test_decode_hybrid,
test_decode_kv_step): the zoo's GPT-2 and Llama-GQA configs with an LM head, 128 positions (prompt + 64 new tokens
exceed the zoo's 64) and weights drawn with std 0.3, so greedy decoding does not collapse onto one token; greedy
decoding by re-running a whole program on the growing sequence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

PROMPT = [5, 17, 42]
NEW = 64


def _lm(family: str) -> torch.nn.Module:
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=128, attn_implementation="sdpa",
                         bos_token_id=1, eos_token_id=2, use_cache=False)
        lm = GPT2LMHeadModel(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                          attn_implementation="sdpa", use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        lm = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return lm.eval()


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
    """family → folder of the saved LM (module scope: one save per test module)."""
    root = tmp_path_factory.mktemp("lm")
    out = {}
    for family in ("gpt2", "llama"):
        _lm(family).save_pretrained(root / family)
        out[family] = root / family
    return out


def _reference_tokens(program: torch.nn.Module, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by re-running the whole converted model on the growing sequence (no state)."""
    seq, toks, logits = list(prompt), [], []
    for _ in range(n):
        ids = torch.tensor([seq])
        with torch.no_grad():
            last = program(input_ids=ids, attention_mask=torch.ones_like(ids))[0][0, -1]
        toks.append(int(last.argmax()))
        logits.append(last)
        seq.append(toks[-1])
    return toks, logits


def _reference_tokens_from(prompt, program, n):
    """As :func:`_reference_tokens`, for a one-token prompt (the exported program takes N >= 2: the first token
    is read from a 2-token run's first position, which causal attention makes independent of the second)."""
    toks, logits = [], []
    with torch.no_grad():
        ids = torch.tensor([prompt + [0]])
        first = program(input_ids=ids, attention_mask=torch.ones_like(ids))[0][0, 0]
    toks.append(int(first.argmax()))
    logits.append(first)
    more, more_logits = _reference_tokens(program, prompt + toks, n - 1)
    return toks + more, logits + more_logits


def _max_err(got: list[np.ndarray], ref: list[torch.Tensor]) -> float:
    return max(float(np.abs(g - r.numpy()).max() / max(1.0, float(r.abs().max()))) for g, r in zip(got, ref))
