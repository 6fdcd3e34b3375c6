"""Registers the catalogue's passes with the engine's pass registry: one ``attention.<variant>`` per attention
variant, then the other families (``head.*``, ``detect.soft_nms``, ``ood.mahalanobis``, ``binarize.bivit``).

:func:`register` is this package's ``softswap.passes`` entry point (pyproject.toml); the engine calls it when it
first looks a pass up.
"""
from __future__ import annotations

from typing import Any

from rewrite.attention_pass import AttentionRewritePass
from rewrite.passes import register_exporter, register_pass

from .attention import VARIANTS


def _factory(variant: Any):
    def make(**kwargs: Any) -> AttentionRewritePass:
        return AttentionRewritePass(variant, **kwargs)
    return make


def register() -> None:
    """Register ``attention.<name>`` for every variant of :data:`passes.attention.VARIANTS`, then every family."""
    for variant in VARIANTS.values():
        desc = variant.description or f"replace softmax attention with {variant.name} attention"
        if variant.name == "reference":
            desc = ("replace every attention site with the canonical softmax attention written from the site "
                    "record (proves the binding: outputs must not change)")
        register_pass(f"attention.{variant.name}", _factory(variant), desc,
                      {o.name: (o.default, o.help) for o in variant.options})
    # the other families: each package's register() adds its passes
    from . import binarize, detect, heads, ood
    for family in (heads, detect, ood, binarize):
        family.register()
    register_exporter("decode", _export_decode)


def _export_decode(*args: Any, **kwargs: Any) -> Any:
    """``convert(..., decode=True)``: :func:`passes.decode.export_decode` (imported when first used)."""
    from .decode import export_decode
    return export_decode(*args, **kwargs)
