"""Registers one ``attention.<variant>`` pass per attention variant with the engine's pass registry."""
from __future__ import annotations

from typing import Any

from rewrite.attention_pass import AttentionRewritePass
from rewrite.passes import register_pass

from .attention import VARIANTS


def _factory(variant: Any):
    def make(**kwargs: Any) -> AttentionRewritePass:
        return AttentionRewritePass(variant, **kwargs)
    return make


for _variant in VARIANTS.values():
    _desc = _variant.description or f"replace softmax attention with {_variant.name} attention"
    if _variant.name == "reference":
        _desc = ("replace every attention site with the canonical softmax attention written from the site record "
                 "(proves the binding: outputs must not change)")
    register_pass(f"attention.{_variant.name}", _factory(_variant), _desc,
                  {o.name: (o.default, o.help) for o in _variant.options})
