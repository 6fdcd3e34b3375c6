"""The attention rewrite pass: recognize sites, bind each to a variant, emit FX or ONNX, report per site.

The pass is engine machinery parameterized by an :class:`~rewrite.variant.AttentionVariant` (the plugin interface,
defined here in the engine and implemented by the catalogue, which hands its variants in when it registers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from . import emit_fx, emit_onnx, metrics
from .binding import SiteModule, needed_mask_kinds, site_module, supports
from .capture import capture_fx, capture_onnx
from .errors import OptionError
from .graph.fx import FxGraph
from .graph.onnx_graph import OnnxGraph
from .io import LoadedModel, synth_inputs
from .passes import Pass, PassResult
from .recognize import recognize
from .sites import AttentionSite
from .variant import AttentionVariant

log = logging.getLogger(__name__)


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Cosine similarity, relative error and max abs error of a site's output (:func:`rewrite.metrics.fidelity`)."""
    full = metrics.fidelity(reference, candidate)
    return {k: full[k] for k in ("cosine", "rel_error", "max_abs")}


def _parse_selection(spec: Any, n_sites: int, what: str) -> set[int]:
    """Site selection: ints, ``"0,2,5-7"``, or names like ``"attn3"``; None = no selection (every site).

    Raises :class:`OptionError` naming ``--<what>`` for an empty selection or item, a reversed span (``9-2``), an
    unreadable item or an index outside the model's sites: a selection that would select nothing is never read as
    "no selection".
    """
    if spec is None:
        return set()
    items = list(spec) if isinstance(spec, (list, tuple, set)) else str(spec).split(",")
    if not items or all(not str(i).strip() for i in items):
        raise OptionError(f"--{what} {spec!r}: empty selection (give site indices like 0,2,4-6 or names attnN)")
    out: set[int] = set()
    for item in items:
        text = str(item).strip()
        if not text:
            raise OptionError(f"--{what} {spec!r}: empty item (use indices like 0,2,4-6 or site names attnN)")
        try:
            if text.startswith("attn"):
                out.add(int(text[4:]))
            elif "-" in text[1:]:
                lo_text, hi_text = text.split("-", 1) if not text.startswith("-") else ("-" + text[1:].split("-", 1)[0],
                                                                                          text[1:].split("-", 1)[1])
                lo, hi = int(lo_text), int(hi_text)
                if hi < lo:
                    raise OptionError(f"--{what}: span {text!r} is reversed (write {hi}-{lo})")
                out.update(range(lo, hi + 1))
            else:
                out.add(int(text))
        except ValueError:
            raise OptionError(f"--{what}: cannot read {text!r} (use indices like 0,2,4-6 or site names attnN)") from None
    bad = sorted(i for i in out if i < 0 or i >= n_sites)
    if bad:
        raise OptionError(f"--{what}: site index {bad} out of range (the model has {n_sites} attention sites)")
    return out


def _param_digest(module: torch.nn.Module) -> str:
    """A digest of the module's parameter values: the ONNX exporter folds parameters into constants, so two sites
    share an exported sub-graph only when their parameters are equal, not merely of equal shape."""
    import hashlib
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


@dataclass
class SiteDecision:
    site: AttentionSite
    replace: bool
    reason: str = ""


class AttentionRewritePass(Pass):
    """Replace every qualifying attention site with ``variant``."""

    requires = ()
    ensures = ("attention:rewritten",)

    def __init__(self, variant: AttentionVariant, options: Mapping[str, Any] | None = None, layers: Any = None,
                 keep_softmax: Any = None, measure: bool = True, params: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> None:
        self.variant = variant
        self.name = f"attention.{variant.name}"
        try:
            self.variant_options = variant.resolve_options(dict(options or {}))
        except (KeyError, ValueError) as exc:
            raise OptionError(f"{self.name}: {exc.args[0] if exc.args else exc}") from None
        self.layers = layers
        self.keep_softmax = keep_softmax
        self.measure = measure
        self.site_params = dict(params or {})

    # ------------------------------------------------------------------------------------------------------
    def decide(self, sites: Sequence[AttentionSite]) -> list[SiteDecision]:
        layers = _parse_selection(self.layers, len(sites), "layers")
        keep = _parse_selection(self.keep_softmax, len(sites), "keep-softmax")
        decisions = []
        for index, site in enumerate(sites):
            if layers and index not in layers:
                decisions.append(SiteDecision(site, False, "not selected by --layers"))
            elif index in keep:
                decisions.append(SiteDecision(site, False, "kept as softmax (--keep-softmax)"))
            elif site.layout == "BSE":
                decisions.append(SiteDecision(site, False, f"fused op {site.spelling} with packed projections is "
                                                            "reported but not rewritten yet"))
            elif not supports(self.variant.mask_kinds, site.mask):
                decisions.append(SiteDecision(site, False, f"mask kind {site.mask!r} needs "
                                                           f"{sorted(needed_mask_kinds(site.mask))}; variant "
                                                           f"{self.variant.name!r} supports {sorted(self.variant.mask_kinds)}"))
            else:
                decisions.append(SiteDecision(site, True))
        return decisions

    def _options_for(self, model: LoadedModel) -> dict[str, Any]:
        options = dict(self.variant_options)
        hf = model.extra.get("hf")
        if "n_ref" in options and options["n_ref"] is None:
            cfg = getattr(hf, "config", None)
            options["n_ref"] = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        return options

    def _module(self, site: AttentionSite, g: Any, options: Mapping[str, Any]) -> SiteModule:
        return site_module(self.variant, site, g, options, self.site_params.get(site.name))

    # ------------------------------------------------------------------------------------------------------
    def run(self, model: LoadedModel) -> PassResult:
        if model.kind == "fx":
            return self._run_fx(model)
        return self._run_onnx(model)

    def _site_report(self, decisions: list[SiteDecision], fid: Mapping[str, dict[str, float]],
                     options: Mapping[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for d in decisions:
            row = d.site.summary()
            row.update({"variant": self.variant.name, "options": {k: v for k, v in options.items()},
                        "status": "replaced" if d.replace else "skipped", "reason": d.reason})
            if d.site.name in fid:
                row["fidelity"] = fid[d.site.name]
            rows.append(row)
        return rows

    def _fidelity(self, modules: Mapping[str, SiteModule], captured: Mapping[str, list[torch.Tensor]]
                  ) -> dict[str, dict[str, float]]:
        out = {}
        for name, module in modules.items():
            tensors = captured.get(name)
            if tensors is None:
                continue
            with torch.no_grad():
                candidate = module(*tensors[:-1])
            out[name] = fidelity(tensors[-1], candidate)
        return out

    def _plan(self, g: Any, model: LoadedModel) -> tuple[list[SiteDecision], dict[str, Any], list[AttentionSite],
                                                        dict[str, SiteModule]]:
        """Recognize, decide per site, and build the chosen sites' modules (both graph kinds)."""
        decisions = self.decide(recognize(g).attention_sites)
        options = self._options_for(model)
        chosen = [d.site for d in decisions if d.replace]
        return decisions, options, chosen, {s.name: self._module(s, g, options) for s in chosen}

    def _report(self, decisions: list[SiteDecision], fid: Mapping[str, dict[str, float]],
                options: Mapping[str, Any], replaced: int) -> dict[str, Any]:
        return {"pass": self.name, "sites": self._site_report(decisions, fid, options), "replaced": replaced,
                "found": len(decisions)}

    def _run_fx(self, model: LoadedModel) -> PassResult:
        from .emit_fx import _example_call
        gm = model.ep.module()
        g = FxGraph(gm)
        decisions, options, chosen, modules = self._plan(g, model)
        fid: dict[str, dict[str, float]] = {}
        if chosen and self.measure and (model.example_inputs or getattr(model.ep, "example_inputs", None)):
            args, kwargs = _example_call(model)
            fid = self._fidelity(modules, capture_fx(gm, chosen, args, kwargs))
        report = self._report(decisions, fid, options, len(chosen))
        if not chosen:
            return PassResult(model, False, report)
        emit_fx.splice(gm, [(s, modules[s.name]) for s in chosen])
        ep = emit_fx.reexport(model, gm)
        new = LoadedModel(kind="fx", source=model.source, ep=ep, example_inputs=model.example_inputs,
                          input_names=model.input_names, output_names=model.output_names, extra=dict(model.extra))
        return PassResult(new, True, report)

    def _run_onnx(self, model: LoadedModel) -> PassResult:
        onnx_model = model.onnx.clone()
        opset = onnx_model.opset_imports.get("", 17)
        if opset < 18:
            onnx_model = emit_onnx.upgrade_opset(onnx_model, 18)
            opset = 18
        g = OnnxGraph(onnx_model)
        decisions, options, chosen, modules = self._plan(g, model)
        fid: dict[str, dict[str, float]] = {}
        captured: dict[str, list[torch.Tensor]] = {}
        if chosen:
            feeds = model.extra.get("feeds") or synth_inputs(LoadedModel(kind="onnx", source=model.source, onnx=onnx_model))
            captured = capture_onnx(onnx_model, chosen, feeds, source=model.source)
            if self.measure:
                fid = self._fidelity(modules, captured)
        report = self._report(decisions, fid, options, len(chosen))
        if not chosen:
            return PassResult(model, False, report)
        exporter = emit_onnx.OnnxSiteExporter(opset)
        for site in chosen:
            site_inputs = captured[site.name][:-1] if site.name in captured else None
            tensors, dynamic, signature = emit_onnx.site_signature(g, site, site_inputs)
            module = modules[site.name]
            key = (self.variant.name, tuple(sorted((k, repr(v)) for k, v in options.items())), module.spec,
                   signature, _param_digest(module))
            sub = exporter.export(module, key, tensors, dynamic, site.name)
            emit_onnx.splice(onnx_model, g, site, sub)
        emit_onnx.finish(onnx_model)
        new = LoadedModel(kind="onnx", source=model.source, onnx=onnx_model, example_inputs=model.example_inputs,
                          input_names=model.input_names, output_names=model.output_names, extra=dict(model.extra))
        return PassResult(new, True, report)
