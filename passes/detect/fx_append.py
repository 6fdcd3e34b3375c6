"""Append Soft-NMS to a ``torch.export`` program whose outputs include boxes and scores.

The result is a re-exported program with two more outputs: the kept indices (int64, selection order) and their
decayed scores. ``torchvision`` is not needed (it is not installable beside our torch); the Soft-NMS math is
:func:`passes.detect.soft_nms.soft_nms` (per class via class offsets when a label output is named).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from rewrite.errors import OptionError, UnsupportedModelError

from .config import SoftNMSConfig
from .soft_nms import batched_soft_nms, soft_nms


class _WithSoftNMS(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, boxes: int, scores: int, labels: int | None,
                 cfg: SoftNMSConfig) -> None:
        super().__init__()
        self.inner, self.boxes, self.scores, self.labels, self.cfg = inner, boxes, scores, labels, cfg

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        out = self.inner(*args, **kwargs)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        boxes, scores = outs[self.boxes], outs[self.scores]
        if self.labels is None:
            keep, kept = soft_nms(boxes, scores, self.cfg)
        else:
            keep, kept = batched_soft_nms(boxes, scores, outs[self.labels], self.cfg)
        return (*outs, keep, kept)


def append_soft_nms(program: torch.export.ExportedProgram | torch.nn.Module, example_inputs: Sequence[Any] | None = None,
                    *, boxes: int = 0, scores: int = 1, labels: int | None = None, cfg: SoftNMSConfig | None = None,
                    **params: Any) -> torch.export.ExportedProgram:
    """``program`` (or an ``nn.Module`` with ``example_inputs``) followed by Soft-NMS, re-exported.

    ``boxes``, ``scores`` (and optionally ``labels``) are indices into the flat outputs: boxes (N, 4) xyxy, scores
    (N,), labels (N,) int. The new program returns the original outputs then ``keep`` (K,) int64 and
    ``kept_scores`` (K,). ``cfg`` or keyword parameters of :class:`SoftNMSConfig` (``max_det`` bounds the loop).
    Raises :class:`OptionError` for an output index out of range, :class:`UnsupportedModelError` for outputs of
    the wrong shape.
    """
    if cfg is None:
        cfg = SoftNMSConfig(**params)
    elif params:
        raise OptionError("append_soft_nms: give cfg or keyword parameters, not both")
    if isinstance(program, torch.export.ExportedProgram):
        module = program.module()
        if example_inputs is None:
            example = program.example_inputs
            if example is None:
                raise OptionError("append_soft_nms: the program carries no example inputs; pass example_inputs")
            args, kwargs = example
        else:
            args, kwargs = tuple(example_inputs), {}
    else:
        if example_inputs is None:
            raise OptionError("append_soft_nms: an nn.Module needs example_inputs")
        module, args, kwargs = program, tuple(example_inputs), {}
    with torch.no_grad():
        out = module(*args, **kwargs)
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    for what, index in (("boxes", boxes), ("scores", scores), ("labels", labels)):
        if index is not None and not 0 <= index < len(outs):
            raise OptionError(f"append_soft_nms: {what}={index} but the program has {len(outs)} outputs")
    if outs[boxes].dim() != 2 or outs[boxes].shape[-1] != 4:
        raise UnsupportedModelError(f"append_soft_nms: output {boxes} (boxes) has shape {tuple(outs[boxes].shape)}, "
                                    "expected (N, 4)")
    if outs[scores].shape != outs[boxes].shape[:1]:
        raise UnsupportedModelError(f"append_soft_nms: output {scores} (scores) has shape "
                                    f"{tuple(outs[scores].shape)}, expected ({outs[boxes].shape[0]},)")
    wrapper = _WithSoftNMS(module, boxes, scores, labels, cfg)
    return torch.export.export(wrapper, args, kwargs)
