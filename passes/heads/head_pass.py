"""The ``head.<kind>`` passes: find the classifier head, capture its input feature over the fitting data, fit the
replacement head on the fit split (float64), measure held-out accuracy of the original and the new head, and splice
the new head into the FX program or the ONNX graph (graph output names kept; added outputs named in the report).

One pass class serves both graph kinds: recognition (:func:`rewrite.recognize.recognize`), capture
(:func:`rewrite.capture.capture_values`) and the splice (:mod:`rewrite.emit_region`) are the engine's.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch

from rewrite.capture import capture_values
from rewrite.emit_region import Region, prepare_onnx, splice_fx, splice_onnx
from rewrite.errors import OptionError
from rewrite.fit_data import FitData, FitDataError, check_labels
from rewrite.graph.fx import FxGraph
from rewrite.graph.onnx_graph import OnnxGraph
from rewrite.io import LoadedModel
from rewrite.passes import Pass, PassResult
from rewrite.recognize import recognize
from rewrite.sites import ClassifierHead

from .fitters import COMMON_OPTIONS, HeadKind, WithActivation

log = logging.getLogger(__name__)

#: Rows of the captured features handed to the ONNX exporter as the region's example.
EXAMPLE_ROWS = 4


def resolve_options(kind: HeadKind, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of the common and the kind's options overlaid with ``given`` (CLI strings converted);
    :class:`OptionError` names an unknown option or a bad value."""
    known = {o.name: o for o in COMMON_OPTIONS + kind.options}
    out = {name: o.default for name, o in known.items()}
    for key, value in given.items():
        if key not in known:
            raise OptionError(f"head.{kind.name}: no option {key!r}; options: {', '.join(sorted(known))}")
        if key == "class_order" and isinstance(value, (list, tuple)):
            value = ",".join(str(int(v)) for v in value)
        try:
            out[key] = known[key].convert(value)
        except ValueError as exc:
            raise OptionError(f"head.{kind.name}: {exc}") from None
    if not out["held_out"] < 1.0:
        raise OptionError(f"head.{kind.name}: option held_out={out['held_out']}: must be < 1")
    return out


def recover_linear(features: np.ndarray, scores: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The original head's weight (K, D) and bias (K,) from captured (features, scores) by least squares in
    float64 (exact for a linear head up to rounding; the minimum-norm solution when features are rank-deficient),
    and the largest absolute residual."""
    f = np.asarray(features, dtype=np.float64)
    a = np.concatenate([f, np.ones((f.shape[0], 1))], axis=1)
    sol, *_ = np.linalg.lstsq(a, np.asarray(scores, dtype=np.float64), rcond=None)
    residual = float(np.abs(a @ sol - scores).max()) if len(f) else 0.0
    return torch.from_numpy(sol[:-1].T.copy()), torch.from_numpy(sol[-1].copy()), residual


class HeadPass(Pass):
    """Replace one classifier head with the head of ``kind``, fitted on ``fit``."""

    requires = ()
    ensures = ("head:replaced",)

    def __init__(self, kind: HeadKind, options: Mapping[str, Any] | None = None, fit: FitData | None = None) -> None:
        self.kind = kind
        self.name = f"head.{kind.name}"
        self.description = kind.description
        self.resolved = resolve_options(kind, dict(options or {}))
        self.fit_data = fit

    # ------------------------------------------------------------------------------------------------------
    def _choose(self, heads: list[ClassifierHead]) -> tuple[ClassifierHead, list[dict[str, Any]]]:
        wanted = self.resolved["head"] or heads[0].name
        names = [h.name for h in heads]
        if wanted not in names:
            raise OptionError(f"{self.name}: option head={wanted!r}: the model's heads are {', '.join(names)}")
        rows = [{**h.summary(), "status": "skipped", "reason": f"not selected (option head={wanted})"}
                for h in heads if h.name != wanted]
        return next(h for h in heads if h.name == wanted), rows

    def run(self, model: LoadedModel) -> PassResult:
        if model.kind == "fx":
            gm = model.ep.module()
            g: Any = FxGraph(gm)
            out_node = next(n for n in gm.graph.nodes if n.op == "output")
            outputs = list(torch.utils._pytree.tree_leaves(out_node.args[0]))
            onnx_model = None
        else:
            onnx_model = prepare_onnx(model)
            g = OnnxGraph(onnx_model)
            outputs = list(onnx_model.graph.outputs)
        heads = recognize(g, outputs).heads
        if not heads:
            return PassResult(model, False, {"pass": self.name, "sites": [], "replaced": 0, "found": 0,
                                             "lines": [f"{self.name}: the model has no classifier head"]})
        if self.fit_data is None:
            raise OptionError(f"{self.name}: fitting a head needs data: --fit DATA.npz (model inputs and labels y)")
        head, rows = self._choose(heads)
        where = f"{head.name} ({head.node})"
        k = int(head.num_classes)
        o = self.resolved
        if self.kind.all_classes:
            check_labels(self.fit_data, k, f"head {where}")
        elif int(self.fit_data.y.max()) >= k:
            raise FitDataError(f"{self.fit_data.source}: label {int(self.fit_data.y.max())} is out of range: head "
                               f"{where} has {k} classes (labels 0..{k - 1})")
        self.kind.check(k, o, f"{self.name} on {where}")
        fit_part, held = self.fit_data.split(o["held_out"], o["seed"])
        values = [head.feature, head.scores, head.output_value]
        feats, scores, _ = self._capture(model, g, values, fit_part)
        if feats.ndim != 2:
            raise FitDataError(f"{self.fit_data.source}: the feature feeding {where} has shape {feats.shape}; "
                               "expected (samples, features)")
        held_feats, _, held_out_orig = self._capture(model, g, values, held)
        w0, b0, residual = recover_linear(feats, scores)
        log.info("%s: original head recovered from captured scores (max residual %.2e)", where, residual)
        f64 = torch.from_numpy(np.asarray(feats, dtype=np.float64))
        y64 = torch.from_numpy(fit_part.y)
        fitted = self.kind.fit(f64, y64, w0, b0, k, o, where)
        module = fitted.module
        if not fitted.removes_activation and head.activation != "none":
            module = WithActivation(module, head.activation)
        module = module.float().eval()
        with torch.no_grad():
            out = module(torch.from_numpy(np.asarray(held_feats, dtype=np.float32)))
            new_out = (out[0] if isinstance(out, tuple) else out).numpy()
        acc_orig = float((np.asarray(held_out_orig).argmax(-1) == held.y).mean())
        acc_new = float((new_out.argmax(-1) == held.y).mean())
        region = Region(name=f"{self.kind.name}_{head.name}", inputs=[head.feature], replaces=[head.output_value],
                        adds=list(fitted.adds), rule=self.name)
        if model.kind == "fx":
            new_model = splice_fx(model, gm, [(region, module)])
        else:
            example = torch.from_numpy(np.asarray(held_feats[:EXAMPLE_ROWS], dtype=np.float32))
            if example.shape[0] < 2:
                example = torch.from_numpy(np.asarray(feats[:EXAMPLE_ROWS], dtype=np.float32))
            new_model = splice_onnx(model, onnx_model, [(region, module)], {region.name: [example]})
        removed = head.activation if (fitted.removes_activation and head.activation != "none") else None
        position = next((i for i, v in enumerate(outputs) if v is head.output_value), None)
        shown = model.output_names[position] if position is not None and position < len(model.output_names) \
            else head.output
        row = {**head.summary(), "status": "replaced", "reason": "", "head": self.kind.name,
               "fit_samples": len(fit_part), "held_out_samples": len(held),
               "accuracy_original": acc_orig, "accuracy_new": acc_new, "fit": fitted.info,
               "added_outputs": list(fitted.adds), "removed_activation": removed, "graph_output": shown}
        lines = [f"{self.name} on {where}, {head.in_features} -> {k} classes: held-out accuracy "
                 f"{100 * acc_orig:.2f}% (original head) -> {100 * acc_new:.2f}% ({self.kind.name} head) on "
                 f"{len(held)} samples; fitted on {len(fit_part)}"]
        if removed:
            lines.append(f"{self.name}: the original {removed} was removed; output {shown!r} now carries "
                         f"{'margins' if self.kind.name == 'svm' else 'logits'}")
        if fitted.adds:
            lines.append(f"{self.name}: added outputs {', '.join(fitted.adds)}")
        if "warning" in fitted.info:
            lines.append(f"{self.name}: warning: {fitted.info['warning']}")
        report = {"pass": self.name, "sites": [row] + rows, "replaced": 1, "found": len(heads), "lines": lines,
                  "added_outputs": list(fitted.adds)}
        return PassResult(new_model, True, report)

    def _capture(self, model: LoadedModel, g: Any, values: list[Any], data: FitData) -> list[np.ndarray]:
        feeds = {name: data.inputs[name] for name in model.input_names}
        return capture_values(model, g, values, feeds)
