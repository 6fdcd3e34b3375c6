"""BiViT binarisation (spec heads_and_postprocess.md §4): operators (:mod:`.ops`), trainable and deploy modules
(:mod:`.modules`), the recognition rule from attention sites to block Linears (:mod:`.locate`), the FX rewrite
(:mod:`.fx_rewrite`), the size report (:mod:`.size`) and the ``binarize.bivit`` pass (:mod:`.bivit`)."""
from __future__ import annotations

from typing import Any


def register() -> None:
    """Register ``binarize.bivit`` with the engine's pass registry."""
    from rewrite.passes import register_pass

    from .bivit import NAME, OPTIONS, BiViTPass

    def make(**kwargs: Any) -> BiViTPass:
        return BiViTPass(options=kwargs.get("options"))

    register_pass(NAME, make, BiViTPass.description, OPTIONS)
