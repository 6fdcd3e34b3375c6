"""Detection post-processing: Soft-NMS (Bodla et al., ICCV 2017) for torch, torch.export and ONNX.

- :mod:`.config`: the options and their resolved form (:class:`SoftNMSConfig`), semantics in its docstring;
- :mod:`.soft_nms`: the PyTorch function (``soft_nms``, ``batched_soft_nms``, ``soft_nms_groups``);
- :mod:`.onnx_nms`: the same as a standard ONNX ``Loop`` sub-graph with ``NonMaxSuppression``'s interface;
- :mod:`.nms_pass`: the ``detect.soft_nms`` pass replacing ONNX ``NonMaxSuppression`` nodes;
- :mod:`.fx_append`: ``append_soft_nms``, appending Soft-NMS to a program that outputs boxes and scores.
"""
from __future__ import annotations

from typing import Any

from .config import OPTIONS, SoftNMSConfig, resolve_options
from .fx_append import append_soft_nms
from .soft_nms import batched_soft_nms, soft_nms, soft_nms_groups


def register() -> None:
    """Register ``detect.soft_nms`` with the engine's pass registry."""
    from rewrite.passes import register_pass

    from .nms_pass import SoftNMSPass

    def make(**kwargs: Any) -> SoftNMSPass:
        return SoftNMSPass(**kwargs)

    register_pass(SoftNMSPass.name, make, SoftNMSPass.description, SoftNMSPass.options)


__all__ = ["OPTIONS", "SoftNMSConfig", "append_soft_nms", "batched_soft_nms", "register", "resolve_options",
           "soft_nms", "soft_nms_groups"]
