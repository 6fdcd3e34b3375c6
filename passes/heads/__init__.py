"""Classifier-head replacements: SVM (:mod:`.svm`), Z-loss (:mod:`.zloss`), Fourier (:mod:`.fourier`), their
losses (:mod:`.losses`) and the ``head.<kind>`` passes (:mod:`.head_pass`) fitted on data (:mod:`.fitters`)."""
from __future__ import annotations

from typing import Any


def register() -> None:
    """Register ``head.svm``, ``head.zloss`` and ``head.fourier`` with the engine's pass registry."""
    from rewrite.passes import register_pass

    from .fitters import COMMON_OPTIONS, KINDS
    from .head_pass import HeadPass

    def factory(kind: Any):
        def make(**kwargs: Any) -> HeadPass:
            return HeadPass(kind, **kwargs)
        return make

    for kind in KINDS.values():
        register_pass(f"head.{kind.name}", factory(kind), kind.description,
                      {o.name: (o.default, o.help) for o in COMMON_OPTIONS + kind.options})
