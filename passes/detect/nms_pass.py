"""The ``detect.soft_nms`` pass: replace every ONNX ``NonMaxSuppression`` with the Soft-NMS sub-graph.

Per site, Soft-NMS parameters come from the pass options where given, else from the node (see
:mod:`passes.detect.onnx_nms` for the mapping): ``iou`` ← ``iou_threshold`` (absent: 0, the ONNX default),
``score_threshold`` ← the node's ``score_threshold`` (absent: 0.001 for linear / gaussian, none for hard),
``max_det`` ← ``max_output_boxes_per_class`` (absent: 0, which selects nothing, as in ONNX). Option values replace
the node's inputs as constants; node inputs fed at run time stay wired to the sub-graph.

The node's ``selected_indices`` keeps its name (and users); the decayed scores of the selected boxes become a new
graph output ``<selected_indices name>_scores``. FX ``torchvision::nms`` sites are reported and skipped (use
:func:`passes.detect.append_soft_nms` on programs that output boxes and scores).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from rewrite.emit_onnx import finish, upgrade_opset
from rewrite.emit_region import unique_name
from rewrite.graph.onnx_graph import OnnxGraph
from rewrite.io import LoadedModel
from rewrite.passes import Pass, PassResult
from rewrite.recognize import recognize
from rewrite.sites import NMSSite

from .config import DEFAULT_MIN_SCORE, OPTIONS, SoftNMSConfig, resolve_options
from .onnx_native import applies
from .onnx_nms import MATRIX_ALWAYS_BOXES, OPSET, soft_nms_graph, use_isolate, use_matrix, use_top, use_window

log = logging.getLogger(__name__)

_ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
                "float64": onnx.TensorProto.DOUBLE, "bfloat16": onnx.TensorProto.BFLOAT16}


class SoftNMSPass(Pass):
    """Replace every ``NonMaxSuppression`` node of an ONNX model with Soft-NMS (options: :data:`OPTIONS`)."""

    name = "detect.soft_nms"
    description = "replace ONNX NonMaxSuppression with Soft-NMS (linear, gaussian or hard); adds the decayed scores"
    options = {o.name: (o.default, o.help) for o in OPTIONS}

    def __init__(self, options: Mapping[str, Any] | None = None, **_: Any) -> None:
        self.given = dict(options or {})
        self.opts = resolve_options(self.given, self.name)

    # ------------------------------------------------------------------------------------------------------
    def site_config(self, g: OnnxGraph, site: NMSSite) -> tuple[SoftNMSConfig, dict[str, Any]]:
        """The Soft-NMS configuration of ``site`` and, per threshold, where it comes from: ``("option", v)``,
        ``("node", v)`` (a constant or a runtime value's name) or ``("default", v)``."""
        o = self.opts
        sources: dict[str, Any] = {}

        def pick(option: str, value: Any, default: float) -> float:
            if o[option] is not None:
                sources[option] = ("option", o[option])
                return o[option]
            if value is not None:
                number = g.scalar(value)
                sources[option] = ("node", number if number is not None else g.value_name(value))
                return number if number is not None else default
            sources[option] = ("default", default)
            return default

        iou = pick("iou", site.iou_threshold, 0.0)
        floor = -math.inf if o["method"] == "hard" else DEFAULT_MIN_SCORE
        min_score = pick("score_threshold", site.score_threshold, floor)
        max_det = pick("max_det", site.max_output, 0)
        if sources["max_det"][0] == "node" and not isinstance(sources["max_det"][1], str):
            sources["max_det"] = ("node", int(sources["max_det"][1]))
        cfg = SoftNMSConfig(method=o["method"], sigma=o["sigma"], iou_threshold=min(max(float(iou), 0.0), 1.0),
                            min_score=float(min_score), max_det=int(min(max_det, 2 ** 62)),
                            iou_offset=o["iou_offset"], sigma_convention=o["sigma_convention"])
        return cfg, sources

    def run(self, model: LoadedModel) -> PassResult:
        if model.kind != "onnx":
            return self._run_fx(model)
        onnx_model = model.onnx.clone()
        if onnx_model.opset_imports.get("", 17) < OPSET:
            onnx_model = upgrade_opset(onnx_model, OPSET)
        g = OnnxGraph(onnx_model)
        rec = recognize(g)
        rows: list[dict[str, Any]] = [{"name": name, "node": name, "status": "skipped", "reason": str(reason)}
                                      for name, reason in rec.nms_unmatched]
        lines: list[str] = []
        changed, added = [], []
        taken = {v.name for n in onnx_model.graph for v in n.outputs if v.name} | set(onnx_model.graph.initializers) \
            | {v.name for v in onnx_model.graph.inputs}
        for site in rec.nms_sites:
            cfg, sources = self.site_config(g, site)
            scores_name = unique_name(taken, f"{g.value_name(site.output)}_scores")
            readers = [g.node_name(u) for u in g.users(site.output)]
            if g.is_graph_output(site.output):
                changed.append(g.value_name(site.output))
            form = _splice(onnx_model, g, site, cfg, sources, scores_name, taken)
            matrix, window, native, top = form.matrix, form.window, form.native, form.top
            added.append(scores_name)
            reason = ""
            if cfg.max_det == 0:
                reason = "max_output_boxes_per_class is 0 or absent: selects no box (as ONNX NMS); give max_det=N"
            row = {**site.summary(), "status": "replaced", "reason": reason, "method": cfg.method,
                   "options": cfg.summary(), "sources": {k: v[0] for k, v in sources.items()},
                   "scores_output": scores_name, "form": form_name(matrix),
                   "window": window, "native_nms": native, "top": top, "isolate": form.isolate}
            rows.append(row)
            lines.append(f"{site.name} ({site.node}): NonMaxSuppression → Soft-NMS {cfg.method} (N_t="
                         f"{_describe(sources['iou'])}, σ={cfg.sigma:g} {cfg.sigma_convention}, min_score="
                         f"{_describe(sources['score_threshold'])}, max_det={_describe(sources['max_det'])}, "
                         f"iou_offset={cfg.iou_offset}, {form_name(matrix)}, "
                         f"{f'up to {window} picks' if window else '1 pick'} per iteration"
                         f"{'; NonMaxSuppression where a run-time check proves it equal' if native else ''}"
                         f"{f'; the {top} top boxes first where provably enough' if top else ''}"
                         f"{'; isolated boxes outside the loop' if form.isolate else ''}); decayed "
                         f"scores → output '{scores_name}'")
            if readers:
                lines.append(f"  note: {', '.join(readers)} read {g.value_name(site.output)}; scores they gather "
                             f"from the original score tensor are not decayed (read '{scores_name}')")
        report = {"pass": self.name, "sites": rows, "replaced": len(rec.nms_sites),
                  "found": len(rec.nms_sites) + len(rec.nms_unmatched), "lines": lines,
                  "changed_outputs": changed, "added_outputs": added}
        if not rec.nms_sites:
            return PassResult(model, False, report)
        finish(onnx_model)
        new = LoadedModel(kind="onnx", source=model.source, onnx=onnx_model, example_inputs=model.example_inputs,
                          input_names=model.input_names, output_names=[*model.output_names, *added],
                          extra=dict(model.extra))
        return PassResult(new, True, report)

    def _run_fx(self, model: LoadedModel) -> PassResult:
        from rewrite.graph.fx import FxGraph
        rec = recognize(FxGraph(model.ep.module()))
        rows = [{**s.summary(), "status": "skipped", "reason": "FX torchvision::nms is not rewritten in place (its "
                 "callers read the original scores); use passes.detect.append_soft_nms"} for s in rec.nms_sites]
        return PassResult(model, False, {"pass": self.name, "sites": rows, "replaced": 0, "found": len(rows),
                                         "lines": []})


def _describe(source: tuple[str, Any]) -> str:
    """A parameter for the report line: its number, or the run-time input that feeds it."""
    kind, value = source
    if kind == "node" and isinstance(value, str):
        return f"input {value!r}"
    return f"{value:.6g}" if isinstance(value, float) else f"{value}"


def _constant(graph: ir.Graph, taken: set[str], name: str, value: Any, dtype: Any) -> ir.Value:
    tensor = ir.tensor(np.asarray(value, dtype=dtype).reshape(1), name=unique_name(taken, name))
    v = ir.Value(name=tensor.name, const_value=tensor, shape=ir.Shape([1]), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(v)
    return v


def form_name(matrix: bool | None) -> str:
    """How the sub-graph gets each pick's weights, for the report."""
    if matrix is None:
        return f"run-time choice (weight matrix when N <= {MATRIX_ALWAYS_BOXES}, else IoU rows)"
    return "weight matrix" if matrix else "IoU rows"


@dataclass(frozen=True)
class SpliceForm:
    """How :func:`_splice` built one site's sub-graph (for the report).

    ``matrix``: the weight matrix is precomputed (True; static N ≤ ``MATRIX_MAX_BOXES``), IoU rows are computed in
    the loop (False), or the graph chooses at run time (None: unknown N). ``window``: the multi-select window
    (:func:`passes.detect.onnx_nms.use_window`; 0: one pick per Loop iteration). ``native``: hard NMS tries
    onnxruntime's ``NonMaxSuppression`` first (:mod:`passes.detect.onnx_native`). ``top``: the top-box window
    tried first (:func:`passes.detect.onnx_nms.use_top`; 0: none). ``isolate``: boxes no other box changes skip
    the loop (:func:`passes.detect.onnx_nms.use_isolate`)."""

    matrix: bool | None
    window: int
    native: bool
    top: int
    isolate: bool = False


def _splice(model: ir.Model, g: OnnxGraph, site: NMSSite, cfg: SoftNMSConfig, sources: Mapping[str, Any],
            scores_name: str, taken: set[str]) -> SpliceForm:
    """Insert the Soft-NMS sub-graph before the NMS node, reroute its output and add the scores output; returns the
    form it built (:class:`SpliceForm`)."""
    graph = model.graph
    prefix = f"softswap/{site.name}/"
    dtype = _ONNX_DTYPES.get(g.dtype(site.scores) or "float32", onnx.TensorProto.FLOAT)
    layout = 0 if site.box_layout == "yxyx" else 1
    box_shape, score_shape = g.shape(site.boxes), g.shape(site.scores)
    matrix = use_matrix(box_shape[1] if box_shape is not None and len(box_shape) == 3 else None,
                        score_shape[1] if score_shape is not None and len(score_shape) == 3 else None,
                        cfg.max_det if sources["max_det"][0] != "node" or not isinstance(sources["max_det"][1], str)
                        else None)
    window = use_window(cfg.method, box_shape[1] if box_shape is not None and len(box_shape) == 3 else None,
                        score_shape[1] if score_shape is not None and len(score_shape) == 3 else None)
    top = use_top(cfg.method, box_shape[1] if box_shape is not None and len(box_shape) == 3 else None,
                  score_shape[1] if score_shape is not None and len(score_shape) == 3 else None,
                  cfg.max_det if sources["max_det"][0] != "node" or not isinstance(sources["max_det"][1], str)
                  else None)
    isolate = use_isolate(cfg.method, box_shape[1] if box_shape is not None and len(box_shape) == 3 else None)
    proto = helper.make_model(soft_nms_graph(cfg, layout, dtype, prefix, matrix=matrix, window=window, top=top,
                                             isolate=isolate),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    sub = ir.from_proto(proto).graph

    def param(option: str, value: Any, resolved: Any, np_dtype: Any) -> ir.Value:
        if sources[option][0] == "node" and value is not None:
            return value
        return _constant(graph, taken, f"{prefix}{option}", resolved, np_dtype)

    feeds = [site.boxes, site.scores,  # in the order of onnx_nms.INPUT_NAMES
             param("max_det", site.max_output, cfg.max_det, np.int64),
             param("iou", site.iou_threshold, cfg.iou_threshold, np.float32),
             param("score_threshold", site.score_threshold, cfg.min_score, np.float32)]
    for sub_in, main_in in zip(list(sub.inputs), feeds):
        sub_in.replace_all_uses_with(main_in)
    new_indices, new_scores = sub.outputs
    sub.outputs.clear()
    nodes = list(sub)
    for node in nodes:
        sub.remove(node)
        node.metadata_props["rw.rule"] = f"soft_nms:{site.name}"
        for out in node.outputs:
            if out.name and out not in (new_indices, new_scores):
                out.name = unique_name(taken, out.name)
    graph.insert_before(site.anchor, nodes)
    old = site.output
    new_indices.type, new_indices.shape = old.type, old.shape
    old.replace_all_uses_with(new_indices, replace_graph_outputs=True)
    old_name = old.name or f"{prefix}selected_indices"
    old.name = unique_name(taken, f"{old_name}_hard_nms")
    new_indices.name = old_name  # users and graph outputs keep reading the same name
    new_scores.name = scores_name
    graph.outputs.append(new_scores)
    return SpliceForm(matrix, window, applies(cfg.method, layout, cfg.iou_offset, dtype), top, isolate)
