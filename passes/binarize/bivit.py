"""The ``binarize.bivit`` pass: binarise the attention and MLP Linears of ViT-like FX programs (BiViT).

Options (``--option stage=..,parts=..,ratio=..``):

- ``stage``: ``w1a1`` (default; binary weights, binary activations entering every binarised Linear, sign(Q),
  sign(K), sign(V) and SAB probabilities) or ``1w32a`` (binary weights only; activations and attention stay float);
- ``parts``: ``attention``, ``mlp`` or ``attention+mlp`` (default; ``,`` also separates when given from Python);
- ``ratio``: the SAB threshold ratio r in (0, 1] (default 0.25).

The pass writes the deploy form (:mod:`.modules` ``Frozen*``: constant ±1 weights, constant α) into the program and
re-exports it. Without quantisation-aware training the binarised model is near chance: the report's fidelity
says how far it is from the float model and is expected to be low; ``softswap transfer --binarize bivit`` trains it.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from rewrite import emit_fx, metrics
from rewrite.capture import capture_values
from rewrite.errors import OptionError, UnsupportedModelError
from rewrite.graph.fx import FxGraph
from rewrite.io import LoadedModel
from rewrite.passes import Pass, PassResult
from rewrite.recognize import recognize

from .fx_rewrite import PARTS, STAGES, SitePlan, freeze, install, plan
from .size import size_lines, size_report

log = logging.getLogger(__name__)

NAME = "binarize.bivit"
DEFAULTS = {"stage": "w1a1", "parts": "attention+mlp", "ratio": 0.25}
OPTIONS = {
    "stage": (DEFAULTS["stage"], "w1a1 (binary weights and activations, SAB attention) or 1w32a (binary weights, "
                                 "float activations)"),
    "parts": (DEFAULTS["parts"], "which Linears to binarise: attention, mlp or attention+mlp"),
    "ratio": (DEFAULTS["ratio"], "SAB threshold ratio r in (0, 1]: keep P >= r * max_row P"),
}
BEFORE_QAT_NOTE = ("fidelity before quantization-aware training is expected to be low (W1A1: accuracy near "
                   "chance); this is not a result: train with `softswap transfer --binarize bivit`")


def _expand(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options as given, with ``--option stage=w1a1,parts=attention,mlp,ratio=0.3`` (one CLI item carrying several
    options) split into its options: a comma-separated segment ``k=v`` whose ``k`` is an option of this pass
    starts a new option; any other segment continues the current value."""
    out: dict[str, Any] = {}
    for key, value in dict(options or {}).items():
        if not isinstance(value, str) or "," not in value:
            out[key] = value
            continue
        current = key
        out[current] = ""
        for segment in value.split(","):
            head, sep, tail = segment.partition("=")
            if sep and head.strip() in OPTIONS:
                current = head.strip()
                if current in out:
                    raise OptionError(f"{NAME}: option {current} given twice")
                out[current] = tail.strip()
            else:
                out[current] = f"{out[current]},{segment}" if out[current] else segment
    return out


def resolve_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Checked options: ``stage`` in :data:`STAGES`, ``parts`` a tuple of :data:`PARTS`, ``ratio`` in (0, 1].
    Raises :class:`OptionError` naming the option."""
    opts = dict(DEFAULTS)
    for key, value in _expand(options).items():
        if key not in OPTIONS:
            raise OptionError(f"{NAME}: unknown option {key!r}; known: {', '.join(OPTIONS)}")
        opts[key] = value
    stage = str(opts["stage"]).lower()
    if stage not in STAGES:
        raise OptionError(f"{NAME}: option stage={opts['stage']!r}; expected one of {', '.join(STAGES)}")
    raw = opts["parts"]
    items = list(raw) if isinstance(raw, (list, tuple)) else str(raw).replace("+", ",").split(",")
    parts = tuple(p.strip().lower() for p in items if str(p).strip())
    if not parts or any(p not in PARTS for p in parts):
        raise OptionError(f"{NAME}: option parts={raw!r}; expected attention, mlp or attention+mlp")
    try:
        ratio = float(opts["ratio"])
    except (TypeError, ValueError):
        raise OptionError(f"{NAME}: option ratio={opts['ratio']!r} is not a number") from None
    if not (0.0 < ratio <= 1.0) or not np.isfinite(ratio):
        raise OptionError(f"{NAME}: option ratio={ratio!r} must lie in (0, 1]")
    return {"stage": stage, "parts": tuple(p for p in PARTS if p in parts), "ratio": ratio}


def require_fx(model: LoadedModel) -> None:
    """QAT trains FX programs; an ONNX model is refused with a one-line error."""
    if model.kind != "fx":
        raise UnsupportedModelError(f"{model.source}: BiViT quantization-aware training trains torch.export programs "
                                    "(.pt2, Hugging Face folders, nn.Module), not ONNX; train the source model and "
                                    "export the result to .onnx")


def site_rows(plans: Sequence[SitePlan], fid: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The pass report's per-site rows: name, status, reason, parts (part → "binarized" or why not), linears
    (role → FX node), core (attention core binarised), fidelity (the worst binarised op of the site: its deploy
    module on the float model's own input against the float output) and local_fidelity (per role)."""
    rows = []
    for sp in plans:
        reasons = [f"{part}: {why}" for part, why in sp.parts.items() if why != "binarized"]
        if not sp.core and sp.core_reason:
            reasons.append(f"attention core float ({sp.core_reason})")
        rows.append({"name": sp.site.name, "status": "replaced" if sp.replaced else "skipped",
                     "reason": "; ".join(reasons), "parts": dict(sp.parts),
                     "linears": {role: node.name for role, node in sp.linears.items()},
                     "core": sp.core})
        local = {k.split(":", 1)[1]: v for k, v in fid.items() if k.startswith(sp.site.name + ":")}
        if local:  # the worst op of the site, and every op
            rows[-1]["fidelity"] = {"cosine": min(v["cosine"] for v in local.values()),
                                    "rel_error": max(v["rel_error"] for v in local.values())}
            rows[-1]["local_fidelity"] = local
    return rows


def _capture_local(model: LoadedModel, g: FxGraph, plans: Sequence[SitePlan]
                   ) -> dict[str, list[torch.Tensor]]:
    """Inputs and output of every planned op of the float program on its example inputs (keys ``site:role``);
    must run before :func:`~.fx_rewrite.install` edits the graph."""
    if not model.example_inputs:
        return {}
    values, keys = [], []
    for sp in plans:
        for role, node in sp.linears.items():
            values += [node.args[0], node]
            keys.append((f"{sp.site.name}:{role}", 2))
        if sp.core:
            values += [sp.site.q, sp.site.k, sp.site.v, sp.site.output]
            keys.append((f"{sp.site.name}:core", 4))
    if not values:
        return {}
    feeds = {k: v.detach().numpy() for k, v in model.example_inputs.items() if isinstance(v, torch.Tensor)}
    arrays = capture_values(model, g, values, feeds)
    out, pos = {}, 0
    for key, count in keys:
        out[key] = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays[pos:pos + count]]
        pos += count
    return out


def _local_fidelity(captured: Mapping[str, list[torch.Tensor]], installed: Mapping[str, Any]
                    ) -> dict[str, dict[str, float]]:
    """Per binarised op: its deploy module on the float model's own input vs the float output (keys
    ``site:role``; cosine and relative error)."""
    modules = {f"{site}:{role}": module for site, role, module in installed.values()}
    out = {}
    for key, tensors in captured.items():
        with torch.no_grad():
            candidate = modules[key].freeze()(*tensors[:-1])
        full = metrics.fidelity(tensors[-1], candidate)
        out[key] = {k: round(full[k], 5) for k in ("cosine", "rel_error")}
    return out


def binarize_program(model: LoadedModel, options: Mapping[str, Any], enabled_parts: Sequence[str] | None = None,
                     measure: bool = True, own_params: bool = False
                     ) -> tuple[Any, dict[str, Any], list[SitePlan], dict[str, Any]]:
    """Recognise, plan and install trainable BiViT modules into a fresh ``model.ep.module()``.

    Returns (graph module with trainable modules, installed modules, plans, partial report: sites, size, local
    fidelity). ``enabled_parts`` (default: the option's parts) are binarised from the start; the others start
    float (the staged schedule of :mod:`passes.transfer.bivit`). ``own_params``: deep-copy the program first
    (``ep.module()`` shares its parameter tensors with the program, so a module that will be trained must own
    them)."""
    require_fx(model)
    opts = resolve_options(options)
    gm = copy.deepcopy(model.ep.module()) if own_params else model.ep.module()
    g = FxGraph(gm)
    sites = recognize(g).attention_sites
    plans = plan(sites, opts["stage"], opts["parts"])
    float_tensors = list(gm.state_dict().values())
    captured = _capture_local(model, g, plans) if measure else {}
    installed = install(gm, plans, opts["stage"], opts["ratio"],
                        enabled_parts=opts["parts"] if enabled_parts is None else enabled_parts)
    shapes = [tuple(m.weight.shape) for _, role, m in installed.values() if role != "core"]
    fid = _local_fidelity(captured, installed)
    report = {"pass": NAME, "options": {**opts, "parts": "+".join(opts["parts"])}, "sites": site_rows(plans, fid),
              "found": len(plans), "replaced": sum(sp.replaced for sp in plans),
              "size": size_report(float_tensors, shapes)}
    return gm, installed, plans, report


def report_lines(report: Mapping[str, Any], note: str | None = BEFORE_QAT_NOTE) -> list[str]:
    """Human summary lines: per site what was binarised / kept and why, the size, and the before-QAT note."""
    lines = []
    for row in report["sites"]:
        what = ", ".join(row["linears"]) or "nothing"
        core = "binary attention core (sign Q/K/V, SAB)" if row["core"] else "float attention core"
        fid = f"; local cosine min {row['fidelity']['cosine']:.3f}" if row.get("fidelity") else ""
        lines.append(f"{row['name']}: {row['status']} ({what}; {core}){fid}"
                     + (f" — {row['reason']}" if row["reason"] else ""))
    lines += size_lines(report["size"])
    if note:
        lines.append(note)
    return lines


class BiViTPass(Pass):
    """``binarize.bivit``: binary q/k/v/o and MLP Linears with learnable per-channel scales, sign activations and
    SAB attention (stage ``w1a1``), or binary weights only (stage ``1w32a``); deploy form written."""

    name = NAME
    description = ("BiViT: binarise the attention (q/k/v/output) and MLP Linears of ViT-like models (binary weights "
                   "with per-channel scales, sign activations, softmax-aware binary attention); needs QAT")
    options = OPTIONS

    def __init__(self, options: Mapping[str, Any] | None = None, **_: Any) -> None:
        self.opts = resolve_options(options)

    def run(self, model: LoadedModel) -> PassResult:
        if model.kind == "onnx":
            return self._run_onnx(model)
        gm, installed, plans, report = binarize_program(model, self.opts)
        report["lines"] = report_lines(report)
        if not installed:
            return PassResult(model, False, report)
        freeze(gm, installed)
        ep = emit_fx.reexport(model, gm)
        new = LoadedModel(kind="fx", source=model.source, ep=ep, example_inputs=model.example_inputs,
                          input_names=model.input_names, output_names=model.output_names, extra=dict(model.extra))
        return PassResult(new, True, report)

    def _run_onnx(self, model: LoadedModel) -> PassResult:
        """ONNX input: the same rule read on the ONNX graph, the deploy form written as ONNX nodes (no local
        fidelity: the model-level fidelity of ``convert`` applies)."""
        from rewrite import emit_onnx
        from rewrite.graph.onnx_graph import OnnxGraph

        from .onnx_rewrite import OnnxEmitter, block_linears_onnx
        onnx_model = model.onnx.clone()
        if onnx_model.opset_imports.get("", 17) < 18:
            onnx_model = emit_onnx.upgrade_opset(onnx_model, 18)
        g = OnnxGraph(onnx_model)
        float_tensors = [v.const_value for v in onnx_model.graph.initializers.values()
                         if v.const_value is not None and v.const_value.dtype.is_floating_point()]
        plans = plan(recognize(g).attention_sites, self.opts["stage"], self.opts["parts"], block_linears_onnx)
        emitter = OnnxEmitter(onnx_model)
        shapes = []
        for sp in plans:
            for role, lin in sp.linears.items():
                shapes.append(emitter.linear(lin, f"{sp.site.name}/{role}", self.opts["stage"] == "w1a1"))
        for sp in plans:
            if sp.core:
                emitter.core(sp.site, self.opts["ratio"])
        emit_onnx.finish(onnx_model)
        report = {"pass": NAME, "options": {**self.opts, "parts": "+".join(self.opts["parts"])},
                  "sites": site_rows(plans, {}), "found": len(plans), "replaced": sum(sp.replaced for sp in plans),
                  "size": size_report(float_tensors, shapes)}
        report["lines"] = report_lines(report)
        if not shapes:
            return PassResult(model, False, report)
        new = LoadedModel(kind="onnx", source=model.source, onnx=onnx_model, example_inputs=model.example_inputs,
                          input_names=model.input_names, output_names=model.output_names, extra=dict(model.extra))
        return PassResult(new, True, report)
