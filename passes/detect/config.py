"""Soft-NMS options and their resolved form, shared by the torch function, the ONNX sub-graph and the pass.

Semantics (spec §5, Bodla et al. 2017, ``cpu_soft_nms``), per group of boxes (one class of one image):

- repeat at most ``max_det`` times: pick the live box M with the highest *current* score (ties: lowest index);
  it is selected with that score if it is ≥ ``min_score``; for every other live box b with o = IoU(M, b):
  ``linear``: s_b ← s_b·(1 − o) if o > N_t (strict), else unchanged;
  ``gaussian`` (Bodla): s_b ← s_b·exp(−o²/σ) for every b (no N_t gate);
  ``gaussian`` (TF convention): s_b ← s_b·exp(−½·o²/σ) and b is discarded when o > N_t (σ_TF = σ_Bodla / 2);
  ``hard``: b is discarded when o > N_t;
  then every live box whose score fell below ``min_score`` is discarded.
- IoU of boxes (x1, y1, x2, y2): widths are x2 − x1 + ``iou_offset`` (0: torchvision / ONNX / mmcv; 1: Bodla's
  legacy pixel convention), intersection widths are clamped at 0, and a pair whose union is ≤ 0 has IoU 0.

One deliberate difference from Bodla's code: his loop keeps the first box even when its score is below the
threshold; here a box is selected only when its current score is ≥ ``min_score`` (every later box is treated
the same way in both). Inputs are never modified; all arithmetic is float64 so the torch and ONNX forms pick the
same boxes (scores are returned in the input's dtype).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from rewrite.errors import OptionError
from rewrite.variant import VariantOption

METHODS = ("linear", "gaussian", "hard")
SIGMA_CONVENTIONS = ("bodla", "tf")

#: Defaults of the spec (Bodla's repository): σ 0.5, N_t 0.3, threshold 0.001.
DEFAULT_SIGMA = 0.5
DEFAULT_IOU = 0.3
DEFAULT_MIN_SCORE = 0.001

#: The options of ``detect.soft_nms``. ``iou``, ``score_threshold`` and ``max_det`` default to None: "take the
#: value from the NonMaxSuppression node being replaced" (see :func:`passes.detect.onnx_nms.node_config`).
OPTIONS: tuple[VariantOption, ...] = (
    VariantOption("method", "linear", str, "linear | gaussian | hard", choices=METHODS),
    VariantOption("sigma", DEFAULT_SIGMA, float, "Gaussian width σ (> 0), in the sigma_convention's units",
                  minimum=0.0, exclusive=True),
    VariantOption("iou", None, float, "N_t in [0, 1]: IoU above which linear decays and hard discards "
                  "(default: the node's iou_threshold)", minimum=0.0, maximum=1.0),
    VariantOption("score_threshold", None, float, "min_score: boxes whose decayed score falls below it are "
                  "dropped (default: the node's score_threshold, else 0.001; hard: none)"),
    VariantOption("max_det", None, int, "most boxes kept per class and image (default: the node's "
                  "max_output_boxes_per_class)", minimum=0),
    VariantOption("iou_offset", 0, int, "0 (width x2 − x1) or 1 (Bodla's x2 − x1 + 1)", minimum=0, maximum=1),
    VariantOption("sigma_convention", "bodla", str, "bodla: exp(−o²/σ); tf: exp(−o²/(2σ)) plus the hard N_t gate "
                  "(TensorFlow / OpenVINO)", choices=SIGMA_CONVENTIONS),
)


_BY_NAME = {o.name: o for o in OPTIONS}


def _check(name: str, value: Any, where: str) -> None:
    """:meth:`VariantOption.check` as an :class:`OptionError` naming the option."""
    try:
        _BY_NAME[name].check(value)
    except ValueError as exc:
        raise OptionError(f"{where}: {exc}") from None


def resolve_options(given: Mapping[str, Any], where: str = "detect.soft_nms") -> dict[str, Any]:
    """Defaults overlaid with ``given`` (CLI strings converted by :meth:`VariantOption.convert`); :class:`OptionError`
    (one line, naming the option) for an unknown option or a bad value."""
    out = {o.name: o.default for o in OPTIONS}
    for key, value in given.items():
        if key not in _BY_NAME:
            raise OptionError(f"{where}: no option {key!r}; options: {', '.join(sorted(_BY_NAME))}")
        try:
            out[key] = _BY_NAME[key].convert(value)
        except ValueError as exc:
            raise OptionError(f"{where}: {exc}") from None
        _check(key, out[key], where)
    return out


@dataclass(frozen=True)
class SoftNMSConfig:
    """Resolved Soft-NMS parameters (see the module docstring for the semantics).

    ``min_score`` may be ``-inf`` (no threshold); ``max_det`` counts boxes per group.
    """

    method: str = "linear"
    sigma: float = DEFAULT_SIGMA
    iou_threshold: float = DEFAULT_IOU
    min_score: float = DEFAULT_MIN_SCORE
    max_det: int = 100
    iou_offset: int = 0
    sigma_convention: str = "bodla"

    def __post_init__(self) -> None:
        """The same checks as the pass options (:data:`OPTIONS`); ``min_score`` may be −∞ but not NaN."""
        for name, value in (("method", self.method), ("sigma_convention", self.sigma_convention),
                            ("sigma", self.sigma), ("iou", self.iou_threshold), ("max_det", self.max_det),
                            ("iou_offset", self.iou_offset)):
            _check(name, value.item() if hasattr(value, "item") and not isinstance(value, (int, float, str))
                   else value, "soft-nms")  # numpy / torch scalars are checked as the Python number they hold
        if math.isnan(self.min_score):
            raise OptionError("soft-nms: score_threshold is NaN")

    @property
    def gaussian_denominator(self) -> float:
        """d in the Gaussian weight exp(−o²/d): σ (Bodla) or 2σ (TF)."""
        return self.sigma if self.sigma_convention == "bodla" else 2.0 * self.sigma

    @property
    def discards_above_threshold(self) -> bool:
        """Whether a box with IoU > N_t against the pick is discarded outright (hard; Gaussian in TF convention)."""
        return self.method == "hard" or (self.method == "gaussian" and self.sigma_convention == "tf")

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "sigma": self.sigma, "iou": self.iou_threshold, "score_threshold":
                self.min_score, "max_det": self.max_det, "iou_offset": self.iou_offset,
                "sigma_convention": self.sigma_convention}
