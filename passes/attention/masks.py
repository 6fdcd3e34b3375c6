"""Mask and dtype helpers shared by every attention variant (spec/attention.md §0, §9).

All helpers are traceable by ``torch.export`` with dynamic sequence lengths: masks are built from ``arange``
comparisons, never from Python control flow on tensor values.

Conventions: a *keep* mask is a bool tensor broadcastable to (B, H, S, T), True = the query may see the key.
``causal`` is bottom-right aligned: query i sees key j iff j <= i + (T - S).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

#: Additive-mask entries at or below this value are treated as "drop" (the contract's "large negative").
#: Any value this low already gives exp(x) == 0 in fp32, so softmax rows with at least one kept entry are unchanged;
#: only fully masked rows differ (they give 0 instead of a uniform average).
DROP_THRESHOLD = -1.0e4


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype for states, sums and normalisers: fp64 for fp64 inputs, fp32 otherwise (fp16/bf16/fp32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def causal_keep(s_len, t_len, device: torch.device, shift: int = 0) -> torch.Tensor:
    """(S, T) bool: key j visible from query i iff j <= i + (T - S) - shift (bottom-right aligned causal)."""
    i = torch.arange(s_len, device=device).unsqueeze(-1)
    j = torch.arange(t_len, device=device).unsqueeze(0)
    return j <= i + (t_len - s_len) - shift


def split_attn_mask(attn_mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split an attention mask into (keep bool, additive bias in ``dtype`` or None).

    A bool mask means True = keep and carries no bias. A float mask is additive: entries <= :data:`DROP_THRESHOLD`
    (including -inf) are dropped; the remaining entries are a bias added to the logits (e.g. ALiBi), with dropped
    entries' bias set to 0 so that no -inf/finfo.min value reaches later arithmetic.
    """
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    m = attn_mask.to(dtype)
    keep = m > DROP_THRESHOLD
    bias = torch.where(keep, m, torch.zeros((), dtype=dtype, device=m.device))
    return keep, bias


def keep_mask(
    s_len,
    t_len,
    *,
    causal: bool,
    key_padding: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """The combined keep mask (bool, broadcastable to (B, H, S, T)) or None when nothing is masked.

    ``key_padding`` is (B, T) bool, True = real token. A float ``attn_mask`` contributes its keep part only
    (see :func:`split_attn_mask` for the bias).
    """
    keep: torch.Tensor | None = None
    if causal:
        keep = causal_keep(s_len, t_len, device)
    if key_padding is not None:
        kp = key_padding.to(torch.bool)[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if attn_mask is not None:
        am = split_attn_mask(attn_mask, torch.float32)[0]
        keep = am if keep is None else keep & am
    return keep


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
