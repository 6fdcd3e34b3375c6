"""The plugin interface of attention variants: the contract every variant implements.

It lives in the engine because the engine calls it (:class:`rewrite.attention_pass.AttentionRewritePass`,
:class:`rewrite.binding.SiteModule`); plugins (the ``passes`` catalogue) implement it.

A variant is plain PyTorch math over canonical tensors. The graph passes (FX and ONNX) call it; the ONNX form is
obtained by exporting the same function, so the formula exists once.

Canonical call::

    out = variant.fn(q, k, v, scale=..., causal=..., key_padding=..., attn_mask=..., params=..., **options)

- ``q``: (B, H, S, D); ``k``: (B, H, T, D); ``v``: (B, H, T, Dv). GQA is expanded by the caller (K/V heads repeated
  with ``repeat_interleave`` on the head axis), so K/V always have H heads.
- ``scale``: the float multiplying q·kᵀ in the original softmax attention (default there D^-1/2).
- ``causal``: query i sees keys j <= i + (T - S) (bottom-right aligned, equal to top-left when S == T).
- ``key_padding``: (B, T) bool, True = real token, or None.
- ``attn_mask``: an additive float mask broadcastable to (B, H, S, T) (0 = keep, large negative = drop), or None;
  only passed to variants whose ``mask_kinds`` contain ``"arbitrary"`` or ``"boolean"`` (for the latter every
  entry is 0 or a drop value).
- ``params``: a dict of learnable tensors (see ``init_params``) or None for the parameter-free form.
- returns (B, H, S, Dv) in q's dtype. State, cumulative sums and normalisers are computed in fp32.

Every function must be traceable by ``torch.export`` with dynamic S and T and exportable by
``torch.onnx.export(dynamo=True)`` to standard ONNX ops (opset 18): no data-dependent Python control flow on shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

#: The mask kinds a variant may declare. "boolean" = any keep/drop pattern (no additive
#: bias); "arbitrary" = any additive float mask, biases included (implies "boolean").
MASK_KINDS = ("none", "causal", "key_padding", "boolean", "arbitrary")


@dataclass(frozen=True)
class VariantOption:
    """One user-settable option of a variant: its default, its type and what it means.

    ``choices`` (strings) lists the accepted values; ``minimum`` is the smallest accepted number (exclusive when
    ``exclusive``), ``maximum`` the largest (exclusive when ``maximum_exclusive``). Floats must be finite.
    :meth:`check` enforces all of it.
    """

    name: str
    default: Any
    type: type
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    exclusive: bool = False
    maximum: float | None = None
    maximum_exclusive: bool = False

    def convert(self, value: Any) -> Any:
        """``value`` (a CLI string or a Python value) as this option's type, checked; ``ValueError`` names the
        option and says what is accepted."""
        if isinstance(value, str) and self.type is not str:
            text = value.strip().lower()
            if self.type is bool:
                if text not in _TRUE + _FALSE:
                    raise ValueError(f"option {self.name}={value!r}: expected true or false")
                value = text in _TRUE
            else:
                try:
                    value = self.type(text)
                except ValueError:
                    raise ValueError(f"option {self.name}={value!r}: expected {'an integer' if self.type is int else 'a number'}") from None
        elif self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise ``ValueError`` (naming the option) unless ``value`` is accepted; ``None`` is accepted only when it
        is the default (meaning "derive it from the model")."""
        if value is None and self.default is None:
            return
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"option {self.name}={value!r}: expected true or false")
            return
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (self.type is int and not isinstance(value, int)):
                raise ValueError(f"option {self.name}={value!r}: expected {'an integer' if self.type is int else 'a number'}")
            if not math.isfinite(value):
                raise ValueError(f"option {self.name}={value!r}: must be a finite number")
            if self.minimum is not None and (value <= self.minimum if self.exclusive else value < self.minimum):
                raise ValueError(f"option {self.name}={value!r}: must be {'>' if self.exclusive else '>='} "
                                 f"{self.minimum:g}")
            if self.maximum is not None and (value >= self.maximum if self.maximum_exclusive else value > self.maximum):
                raise ValueError(f"option {self.name}={value!r}: must be {'<' if self.maximum_exclusive else '<='} "
                                 f"{self.maximum:g}")
            return
        if self.type is str:
            if not isinstance(value, str):
                raise ValueError(f"option {self.name}={value!r}: expected a string")
            if self.choices and value not in self.choices:
                raise ValueError(f"option {self.name}={value!r}: expected one of {', '.join(self.choices)}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class AttentionVariant:
    """A softmax-attention replacement.

    ``fn`` is the canonical call described in this module's docstring. ``mask_kinds`` is the subset of
    :data:`MASK_KINDS` the variant supports (``"none"`` always included). ``encoder_only`` variants reject causal
    sites. ``init_params(heads, head_dim, options)`` returns the learnable parameters (empty dict if none) whose
    initial values make the variant equal to its parameter-free form.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    mask_kinds: frozenset[str]
    options: tuple[VariantOption, ...] = ()
    init_params: Callable[[int, int, Mapping[str, Any]], dict[str, torch.Tensor]] | None = None
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def option_defaults(self) -> dict[str, Any]:
        """The default value of every option, by name."""
        return {o.name: o.default for o in self.options}

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``given`` (strings converted to the option's type).

        Raises ``KeyError`` naming the unknown option, ``ValueError`` naming an option whose value is out of range,
        not finite, not one of its choices or not of its type.
        """
        known = {o.name: o for o in self.options}
        out = self.option_defaults()
        for key, value in given.items():
            if key not in known:
                raise KeyError(f"variant {self.name!r} has no option {key!r}; options: {sorted(known)}")
            out[key] = known[key].convert(value)
        return out
