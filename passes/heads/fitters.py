"""Fitting each replacement head on frozen features (float64), and the options each head kind takes.

A fitter receives the fit part of the captured features (N, D) and labels, the original head's weight and bias
(recovered from the captured scores) and the resolved options; it returns the new head as a float32 module whose
outputs are what the graph gets (the replaced output first, then any added outputs), plus a JSON-able description
of the fit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from rewrite.variant import VariantOption

from . import fourier as fourier_math
from . import losses
from .errors import ClassOrderError
from .svm import SVMHead, fit_linear_svc
from .training import train_head
from .zloss import ZLossHead, check_classes

log = logging.getLogger(__name__)

COMMON_OPTIONS = (
    VariantOption("head", None, str, "which classifier head to replace (head0, head1, ...; default: the only one, "
                  "else head0)"),
    VariantOption("held_out", 0.2, float, "fraction of DATA held out to report accuracy (stratified)", minimum=0.0,
                  exclusive=True),
    VariantOption("seed", 0, int, "seed of the held-out split, the mini-batch order and initialisation"),
    VariantOption("steps", 1000, int, "training steps (Adam, mini-batches) for heads that train", minimum=1),
    VariantOption("minutes", None, float, "time budget of the training in minutes (stops early)", minimum=0.0,
                  exclusive=True),
    VariantOption("lr", 1e-2, float, "Adam learning rate", minimum=0.0, exclusive=True),
    VariantOption("batch", 256, int, "mini-batch size of the training", minimum=1),
    VariantOption("progress", True, bool, "show a progress bar while training"),
)

SVM_OPTIONS = (
    VariantOption("fit", "posthoc", str, "posthoc: LinearSVC on frozen features; finetune: squared-hinge Adam "
                  "fine-tune of the head from its current weights", choices=("posthoc", "finetune")),
    VariantOption("C", 1.0, float, "SVM C (LinearSVC C; the fine-tune's hinge weight)", minimum=0.0, exclusive=True),
    VariantOption("lam", 1.0, float, "fine-tune L2 weight λ of ½‖W‖² (presets override it)", minimum=0.0),
    VariantOption("preset", "none", str, "fine-tune loss preset: agarap (mean(W²) penalty) or tang (sum over "
                  "samples)", choices=losses.SVM_PRESETS),
    VariantOption("standardize", False, bool, "post hoc: standardise features before LinearSVC (folded into the "
                  "head)"),
    VariantOption("max_iter", 1000, int, "post hoc: LinearSVC max_iter", minimum=1),
    VariantOption("tol", 1e-4, float, "post hoc: LinearSVC tol", minimum=0.0, exclusive=True),
    VariantOption("decision_output", False, bool, "add a graph output 'decision': the class, argmax of the margins "
                  "(ONNX ArgMax)"),
)

ZLOSS_OPTIONS = (
    VariantOption("a", 1.0, float, "Z-loss sharpness a", minimum=0.0, exclusive=True),
    VariantOption("b", 0.0, float, "Z-loss location b (keep below √(K−1))"),
    VariantOption("eps", 1e-12, float, "ε added to the population std", minimum=0.0, exclusive=True),
    VariantOption("extra_outputs", False, bool, "add graph outputs 'z' (Z-scores) and 'confidence' "
                  "(sigmoid(a(z − b)))"),
)

FOURIER_OPTIONS = (
    VariantOption("n_freq", None, int, "number of frequencies N (default m/4, at least 1)", minimum=1),
    VariantOption("gamma", fourier_math.DEFAULT_GAMMA, float, "regulariser weight γ (added to the loss)",
                  minimum=0.0),
    VariantOption("class_order", None, str, "permutation mapping class ids to bins, e.g. 2,0,1 (class c sits at "
                  "bin class_order[c])"),
    VariantOption("ordinal", False, bool, "the class ids are already ordinal (bin order = class order)"),
)


@dataclass
class HeadKind:
    """One replacement head: its name, description, options, and the fitter."""

    name: str
    description: str
    options: tuple[VariantOption, ...]
    fit: Callable[..., "Fitted"]
    check: Callable[[int, Mapping[str, Any], str], None] = lambda k, o, where: None
    all_classes: bool = True  # every class needs samples (one-vs-rest fits); ordinal bins may stay empty


@dataclass
class Fitted:
    module: nn.Module
    info: dict[str, Any]
    adds: list[str] = field(default_factory=list)
    removes_activation: bool = True


class WithActivation(nn.Module):
    """A head followed by the original graph's (log-)softmax, for heads whose outputs are logits."""

    def __init__(self, head: nn.Module, activation: str) -> None:
        super().__init__()
        self.head, self.activation = head, activation

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.head(features)
        if self.activation == "softmax":
            return torch.softmax(logits, dim=-1)
        if self.activation == "log_softmax":
            return torch.log_softmax(logits, dim=-1)
        return logits


def _train_common(o: Mapping[str, Any]) -> dict[str, Any]:
    return {k: o[k] for k in ("steps", "lr", "batch", "seed", "minutes", "progress")}


# ------------------------------------------------------------------------------------------------------------
def fit_svm(f: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, k: int,
            o: Mapping[str, Any], where: str) -> Fitted:
    if o["fit"] == "posthoc":
        fit = fit_linear_svc(f.numpy(), y.numpy(), k, C=o["C"], tol=o["tol"], max_iter=o["max_iter"],
                             standardize=o["standardize"], seed=o["seed"])
        head = SVMHead(fit.weight, fit.bias)
        info = {"fit": "posthoc", "solver": "LinearSVC", "C": o["C"], "standardized": fit.standardized,
                "converged": fit.converged, "iterations": fit.iterations}
        if not fit.converged:
            info["warning"] = (f"LinearSVC did not converge in max_iter={o['max_iter']} iterations (raise the "
                               "option max_iter)")
    else:
        head = SVMHead(w0, b0)
        run = train_head(head, lambda m, fb, yb: losses.squared_hinge(m(fb), yb, m.weight, o["C"], o["lam"],
                                                                      o["preset"]),
                         f, y, description=f"{where} svm fine-tune", **_train_common(o))
        info = {"fit": "finetune", "C": o["C"], "lam": o["lam"], "preset": o["preset"], **run.to_dict()}
    head.with_decision = bool(o["decision_output"])
    return Fitted(head.float(), info, ["decision"] if head.with_decision else [])


def check_zloss(k: int, o: Mapping[str, Any], where: str) -> None:
    check_classes(k, where)


def fit_zloss(f: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, k: int,
              o: Mapping[str, Any], where: str) -> Fitted:
    head = ZLossHead(w0, b0, o["a"], o["b"], o["eps"])
    run = train_head(head, lambda m, fb, yb: losses.zloss(m(fb), yb, m.a, m.b, m.eps), f, y,
                     description=f"{where} z-loss", **_train_common(o))
    head.extras = bool(o["extra_outputs"])
    adds = ["z", "confidence"] if head.extras else []
    info = {"a": o["a"], "b": o["b"], "eps": o["eps"], "extra_outputs": adds, **run.to_dict()}
    if o["b"] >= float(np.sqrt(k - 1)):
        info["warning"] = f"b = {o['b']} >= √(K−1) = {np.sqrt(k - 1):.3f}: z_y − b ≤ 0 always, the loss never nears 0"
    return Fitted(head.float(), info, adds)


def parse_class_order(text: Any, k: int) -> list[int] | None:
    """The ``class_order`` option (``"2,0,1"`` or a sequence) as a checked permutation of 0..k−1."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        order = [int(str(i).strip()) for i in items]
    except ValueError:
        raise ClassOrderError(f"option class_order={text!r}: expected comma-separated class ids like 2,0,1") from None
    return fourier_math.check_class_order(order, k)


def check_fourier(k: int, o: Mapping[str, Any], where: str) -> None:
    order = parse_class_order(o["class_order"], k)
    if order is None and not o["ordinal"]:
        raise ClassOrderError(f"{where}: a Fourier head assumes ordered classes (it smooths across neighbouring "
                              "bins); state the order with the option class_order=c0,c1,... or say the class ids "
                              "are ordinal with ordinal=true")


def fit_fourier(f: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, k: int,
                o: Mapping[str, Any], where: str) -> Fitted:
    order = parse_class_order(o["class_order"], k)
    torch.manual_seed(o["seed"])
    head = fourier_math.FourierHead(f.shape[1], k, o["n_freq"], gamma=o["gamma"], class_order=order).double()
    run = train_head(head, lambda m, fb, yb: losses.fourier_loss(m, fb, yb), f, y,
                     description=f"{where} fourier", **_train_common(o))
    info = {"m_bins": k, "n_freq": head.n_freq, "gamma": o["gamma"], "class_order": order or list(range(k)),
            **run.to_dict()}
    return Fitted(head.float(), info, removes_activation=False)


KINDS: dict[str, HeadKind] = {
    "svm": HeadKind("svm", "replace a softmax classifier head with an L2-SVM head (one-vs-rest margins; decision "
                    "argmax of margins) fitted on DATA", SVM_OPTIONS, fit_svm),
    "zloss": HeadKind("zloss", "replace a classifier head with a Z-loss-trained head (logits kept; optional z and "
                      "confidence outputs) trained on DATA's frozen features", ZLOSS_OPTIONS, fit_zloss, check_zloss,
                      all_classes=False),
    "fourier": HeadKind("fourier", "replace a classifier head over ordered classes with a Fourier head (logits "
                        "log(q + 1e-5)) trained on DATA's frozen features", FOURIER_OPTIONS, fit_fourier,
                        check_fourier, all_classes=False),
}
