"""Mask and dtype helpers shared by every attention variant (the conventions of :mod:`rewrite.attention_math`).

All helpers are traceable by ``torch.export`` with dynamic sequence lengths: masks are built from ``arange``
comparisons, never from Python control flow on tensor values.

Conventions: a *keep* mask is a bool tensor broadcastable to (B, H, S, T), True = the query may see the key.
``causal`` is bottom-right aligned: query i sees key j iff j <= i + (T - S).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

# The mask conventions and helpers are the engine's (one definition of softmax attention and its masks).
from rewrite.attention_math import (DROP_THRESHOLD, causal_keep, compute_dtype, keep_mask,  # noqa: E402,F401
                                    split_attn_mask)


def visible_counts(keep: torch.Tensor | None, t_len, dtype: torch.dtype) -> torch.Tensor:
    """n_i = number of keys query i may see, as ``dtype``, shape broadcastable to (B, H, S, 1)."""
    if keep is None:
        return torch.full((1, 1, 1, 1), 1.0, dtype=dtype) * t_len
    return keep.to(dtype).sum(-1, keepdim=True)


def check_mask(
    name: str,
    mask_kinds: Iterable[str],
    *,
    causal: bool,
    key_padding: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` with a reason when the call uses a mask kind the variant does not support."""
    kinds = set(mask_kinds)
    used = []
    if causal:
        used.append("causal")
    if key_padding is not None:
        used.append("key_padding")
    if attn_mask is not None:
        used.append("arbitrary" if "arbitrary" in kinds else "boolean")
    if "arbitrary" in kinds:
        kinds.add("boolean")
    bad = [u for u in used if u not in kinds]
    if bad:
        raise ValueError(
            f"attention variant {name!r} does not support mask kind(s) {bad}; supported: {sorted(kinds)}"
        )


def mask_checked(name: str, mask_kinds: Iterable[str], fn: "Callable[..., torch.Tensor]") -> "Callable[..., torch.Tensor]":
    """``fn`` behind the canonical call, refusing (``ValueError`` with a reason) the mask kinds it does not support.

    Every variant's ``AttentionVariant.fn`` is built with this, so the check is written once.
    """
    kinds = frozenset(mask_kinds)

    def call(q, k, v, *, scale, causal=False, key_padding=None, attn_mask=None, params=None, **options):
        check_mask(name, kinds, causal=causal, key_padding=key_padding, attn_mask=attn_mask)
        return fn(q, k, v, scale=scale, causal=causal, key_padding=key_padding, attn_mask=attn_mask, params=params,
                  **options)

    call.__name__ = call.__qualname__ = f"{name}_checked"
    call.__doc__ = fn.__doc__
    return call
