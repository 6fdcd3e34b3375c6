"""Pass ``ood.mahalanobis``: fit the Mahalanobis detector on feature taps and add one graph output ``ood_score``.

``ood_score`` has shape (batch,) and is HIGHER for inputs MORE LIKELY OUT-OF-DISTRIBUTION (the negated ensemble
confidence; see :mod:`passes.ood.detector`). The original outputs are left bit-identical: the scoring module only
reads the tap values.

Steps: recognize the feature taps (``rewrite.recognize.taps``; ``layers`` selects among them), split the fitting
data (stratified; ``held_out``), capture the taps over it (``rewrite.capture.capture_values``: FX in torch, ONNX in
onnxruntime), fit one tied-covariance Gaussian per tap on the fit part, weight the layers (logistic regression on a
validation half of held-out in-distribution + OOD samples when the data has ``x_ood``, equal z-scored weights
otherwise), report the five metrics on the other half, and splice the scoring module with
``rewrite.emit_region``.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch

from rewrite.capture import capture_values, static_batch
from rewrite.emit_region import Region, open_for_regions
from rewrite.errors import OptionError
from rewrite.fit_data import FitData, FitDataError, check_labels
from rewrite.io import LoadedModel
from rewrite.passes import Pass, PassResult
from rewrite.recognize import find_taps, recognize, select_taps

from .detector import MahalanobisDetector, pool_numpy
from .ensemble import fit_weights
from .gaussian import fit_gaussian
from .metrics import format_metrics, ood_metrics

log = logging.getLogger(__name__)

#: The name of the added graph output.
OUTPUT = "ood_score"

OPTIONS: dict[str, tuple[Any, str]] = {
    "ridge": ("auto", "ridge added to the tied covariance, relative to trace/D (auto: 1e-3 when a class has fewer "
                      "samples than features, else 0); the precision is pinvh of the result"),
    "token_pool": ("mean", "pooling of (B, T, E) taps: mean (token mean) or cls (token 0)"),
    "held_out": (0.3, "fraction of the in-distribution fitting data held out for the layer weights and metrics"),
    "seed": (0, "seed of the splits"),
    "batch": (256, "samples per capture run"),
}


def _option(options: Mapping[str, Any], name: str) -> Any:
    default = OPTIONS[name][0]
    value = options.get(name, default)
    try:
        if name == "ridge":
            return "auto" if value == "auto" else float(value)
        if name == "token_pool":
            return str(value)
        if name == "held_out":
            out = float(value)
            if not 0.0 < out < 1.0:
                raise ValueError
            return out
        return int(value)
    except (TypeError, ValueError):
        raise OptionError(f"ood.mahalanobis: option {name}={value!r} is not valid ({OPTIONS[name][1]})") from None


class MahalanobisPass(Pass):
    """See the module docstring. After :meth:`run`, ``self.detector`` holds the fitted
    :class:`~passes.ood.detector.MahalanobisDetector` (for :func:`passes.ood.preprocess`)."""

    name = "ood.mahalanobis"
    description = ("add an ood_score output (higher = more likely out-of-distribution): Mahalanobis distance to "
                   "class means on feature taps, layer ensemble (needs --fit DATA)")
    options = OPTIONS

    def __init__(self, options: Mapping[str, Any] | None = None, fit: FitData | None = None, layers: Any = None
                 ) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise OptionError(f"ood.mahalanobis: unknown option(s) {unknown}; known: {', '.join(OPTIONS)}")
        self.opts = {k: _option(options, k) for k in OPTIONS}
        if self.opts["token_pool"] not in ("mean", "cls"):
            raise OptionError(f"ood.mahalanobis: option token_pool={self.opts['token_pool']!r}: expected mean or cls")
        if self.opts["ridge"] != "auto" and self.opts["ridge"] < 0:
            raise OptionError(f"ood.mahalanobis: option ridge={self.opts['ridge']} must be >= 0 or auto")
        self.fit = fit
        self.layers = layers
        self.detector: MahalanobisDetector | None = None

    # -----------------------------------------------------------------------------------------------------------
    def run(self, model: LoadedModel) -> PassResult:
        if self.fit is None:
            raise FitDataError("ood.mahalanobis needs fitting data: give --fit DATA (.npz with the inputs, labels 'y' "
                               "and optional 'x_ood')")
        data = self.fit
        view = open_for_regions(model)
        g, outputs = view.graph, view.outputs
        rec = recognize(g, outputs)
        defaults = rec.taps if self.opts["token_pool"] == "mean" else find_taps(g, rec.heads, rec.attention_sites,
                                                                                self.opts["token_pool"])
        taps = select_taps(defaults, self.layers, g, self.opts["token_pool"])
        rows = [{"name": t.name, "node": t.node, "role": t.role, "pool": t.pool, "features": t.features,
                 "status": "skipped", "reason": "not selected by --layers"} for t in defaults if t not in taps]
        if not taps:
            return PassResult(model, False, {"pass": self.name, "sites": rows, "replaced": 0, "found": 0,
                                             "lines": ["no feature taps: the model has no CNN stage output, "
                                                       "attention block or classifier head to read features from"]})
        head = rec.heads[0] if len(rec.heads) == 1 else None
        num_classes = head.num_classes if head is not None and head.num_classes else data.num_classes_seen
        check_labels(data, num_classes, f"the classifier head ({head.node})" if head is not None else "the data")
        if len(data.ood):
            missing = sorted(set(model.input_names) - set(data.ood))
            if missing:
                raise FitDataError(f"{data.source}: OOD samples are missing for inputs {missing}")
        fit_part, held = data.split(self.opts["held_out"], self.opts["seed"])
        head_value = _head_output(g, outputs, head) if head is not None else None
        values = [t.value for t in taps] + ([head_value] if head_value is not None else [])
        batch = self.opts["batch"]
        pools = [t.pool for t in taps] + (["none"] if head_value is not None else [])
        cap_fit, first_rows = _capture_pooled(model, g, values, pools, fit_part.inputs, batch)
        cap_held, _ = _capture_pooled(model, g, values, pools, held.inputs, batch)
        cap_ood = _capture_pooled(model, g, values, pools, data.ood, batch)[0] if len(data.ood) else None
        n_taps = len(taps)
        layers = [fit_gaussian(cap_fit[i], fit_part.y, num_classes, self.opts["ridge"]) for i in range(n_taps)]
        detector = MahalanobisDetector(taps=[t.node for t in taps], pools=[t.pool for t in taps], layers=layers,
                                       weights=None, dtype=_torch_dtype(first_rows[0].dtype))  # type: ignore[arg-type]
        s_held = detector.feature_scores(cap_held[:n_taps])
        lines: list[str] = []
        metrics: dict[str, Any] = {}
        if cap_ood is not None:
            s_ood = detector.feature_scores(cap_ood[:n_taps])
            rng = np.random.default_rng(self.opts["seed"])
            in_perm, out_perm = rng.permutation(len(s_held)), rng.permutation(len(s_ood))
            in_val, in_test = in_perm[: len(in_perm) // 2], in_perm[len(in_perm) // 2:]
            out_val, out_test = out_perm[: len(out_perm) // 2], out_perm[len(out_perm) // 2:]
            if min(len(in_val), len(out_val), len(in_test), len(out_test)) < 2:
                raise FitDataError(f"{data.source}: too few samples for the OOD validation / test halves "
                                   f"({len(s_held)} held-out in-distribution, {len(s_ood)} OOD); need >= 4 of each")
            detector.weights = fit_weights(s_held[in_val], s_ood[out_val], self.opts["seed"])
            score_in = detector.weights.ood_score(s_held[in_test])
            score_out = detector.weights.ood_score(s_ood[out_test])
            metrics["mahalanobis"] = ood_metrics(score_in, score_out)
            for i, tap in enumerate(taps):
                metrics[f"layer {tap.name}"] = ood_metrics(-s_held[in_test, i], -s_ood[out_test, i])
            if head_value is not None:
                metrics["max-softmax"] = ood_metrics(-_max_softmax(cap_held[n_taps][in_test], head.activation),
                                                     -_max_softmax(cap_ood[n_taps][out_test], head.activation))
            lines.append(f"layer weights: logistic regression on {len(in_val)} held-out in-distribution + "
                         f"{len(out_val)} OOD validation samples; metrics on the other {len(in_test)} + "
                         f"{len(out_test)}")
            for method, values_ in metrics.items():
                lines.append(f"{method}: {format_metrics(values_)}")
        else:
            detector.weights = fit_weights(s_held)
            lines.append(f"layer weights: equal (1/{n_taps}) on layer scores z-scored over {len(s_held)} held-out "
                         "in-distribution samples (no x_ood in the fitting data: no OOD metrics)")
        lines.insert(0, f"ood_score = -(sum_l alpha_l M_l + alpha_0), M_l = max_c -d2_c; higher = more likely "
                        f"out-of-distribution; {n_taps} taps: "
                        + ", ".join(f"{t.name}={t.node} ({t.pool}, D={layer.features}, ridge={layer.ridge:g})"
                                    for t, layer in zip(taps, layers)))
        detector.info = {"num_classes": num_classes, "metrics": metrics, "fit_samples": len(fit_part),
                         "held_out_samples": len(held), "ood_samples": 0 if cap_ood is None else len(cap_ood[0])}
        self.detector = detector
        region = Region(name="ood_mahalanobis", inputs=[t.value for t in taps], adds=[OUTPUT], rule=self.name)
        module = detector.module()
        examples = None if model.kind == "fx" else {region.name: _examples(first_rows[:n_taps], static_batch(model))}
        new = view.splice(model, [(region, module)], examples)
        if model.kind == "onnx":
            _name_batch_axis(new)
        for i, (tap, layer) in enumerate(zip(taps, layers)):
            rows.append({"name": tap.name, "node": tap.node, "role": tap.role, "pool": tap.pool,
                         "features": layer.features, "status": "replaced",
                         "reason": f"read by ood_score: {tap.role} {tap.node}, {tap.pool}, D={layer.features}, "
                                   f"weight {detector.weights.alpha[i]:.3g}",
                         "weight": float(detector.weights.alpha[i]), "weight_z": float(detector.weights.beta[i])})
        report = {"pass": self.name, "sites": rows, "replaced": n_taps, "found": len(rows), "lines": lines,
                  "output": OUTPUT, "sign": "higher = more likely out-of-distribution",
                  "ensemble": detector.weights.method, "bias": float(detector.weights.bias), "metrics": metrics,
                  "classes": num_classes}
        return PassResult(new, True, report)


#: Samples per capture run, in units of ``batch``: tap values are pooled per run, so memory holds one run's
#: feature maps, not the data set's.
CAPTURE_RUN_BATCHES = 4


def _capture_pooled(model: LoadedModel, g: Any, values: list[Any], pools: list[str], inputs: Mapping[str, np.ndarray],
                    batch: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(pooled float64 features (N, D) per value, the first 3 raw rows of each value) over every sample of
    ``inputs``, captured in runs of :data:`CAPTURE_RUN_BATCHES` × ``batch`` samples."""
    n = next(iter(inputs.values())).shape[0]
    step = CAPTURE_RUN_BATCHES * batch
    pooled: list[list[np.ndarray]] = [[] for _ in values]
    first: list[np.ndarray] = []
    for start in range(0, n, step):
        got = capture_values(model, g, values, {k: v[start:start + step] for k, v in inputs.items()}, batch)
        if not first:
            first = [np.array(a[:3]) for a in got]
        for sink, arr, pool in zip(pooled, got, pools):
            sink.append(pool_numpy(arr, pool))
    return [np.concatenate(parts) for parts in pooled], first


def _examples(values: list[np.ndarray], fixed: int | None) -> list[torch.Tensor]:
    """Example rows of the tap values for the ONNX export of the scoring module: the model's fixed batch size, else
    3 rows (>= 2, so the exporter keeps the batch axis free), repeating rows when there are fewer."""
    rows = fixed or 3
    return [torch.from_numpy(np.ascontiguousarray(np.resize(v, (rows, *v.shape[1:])))) for v in values]


def _name_batch_axis(model: LoadedModel) -> None:
    """Give ``ood_score``'s axis the batch dim of the first model input (the exporter names it on its own)."""
    import onnx_ir as ir
    graph = model.onnx.graph
    first = graph.inputs[0] if graph.inputs else None
    out = next((o for o in graph.outputs if o.name == OUTPUT), None)
    if first is not None and first.shape is not None and len(first.shape) and out is not None:
        out.shape = ir.Shape([first.shape[0]])


def _torch_dtype(np_dtype: Any) -> torch.dtype:
    return {np.dtype("float16"): torch.float16, np.dtype("float64"): torch.float64}.get(np.dtype(np_dtype),
                                                                                         torch.float32)


def _head_output(g: Any, outputs: list[Any], head: Any) -> Any | None:
    if getattr(head, "output_value", None) is not None:
        return head.output_value
    return next((o for o in outputs if g.value_name(o) == head.output), None)


def _max_softmax(out: np.ndarray, activation: str) -> np.ndarray:
    """The maximum class probability of head outputs (logits, probabilities or log-probabilities)."""
    out = np.asarray(out, dtype=np.float64)
    if activation == "softmax":
        return out.max(axis=1)
    if activation == "log_softmax":
        return np.exp(out.max(axis=1))
    z = out - out.max(axis=1, keepdims=True)
    return 1.0 / np.exp(z).sum(axis=1)


def make_pass(**kwargs: Any) -> MahalanobisPass:
    return MahalanobisPass(**kwargs)
