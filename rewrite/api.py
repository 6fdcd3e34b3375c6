"""The Python API: :func:`inspect`, :func:`convert`, :func:`verify`, :func:`export`. Thin layers over the engine."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import io as mio
from .errors import NoSitesError, OptionError, OutputPathError
from .graph.fx import FxGraph
from .graph.onnx_graph import OnnxGraph
from .passes import PassManager, get_pass
from .recognize import Recognition, recognize
from .verify import VerifyReport, verify as _verify

log = logging.getLogger(__name__)


@dataclass
class InspectReport:
    """What ``softswap inspect`` prints: sites, heads, unmatched softmax nodes with reasons."""

    source: str
    kind: str
    recognition: Recognition
    node_count: int

    @property
    def attention_sites(self) -> list[Any]:
        return self.recognition.attention_sites

    @property
    def heads(self) -> list[Any]:
        return self.recognition.heads

    @property
    def unmatched(self) -> list[Any]:
        return self.recognition.unmatched

    def to_dict(self) -> dict[str, Any]:
        rec = self.recognition
        return {"model": self.source, "graph": self.kind, "nodes": self.node_count,
                "softmax_nodes": rec.softmax_count,
                "attention_sites": [s.summary() for s in rec.attention_sites],
                "heads": [h.summary() for h in rec.heads],
                "feature_taps": [t.summary() for t in rec.taps],
                "unmatched": [{"softmax": name, **reason.summary()} for name, reason in rec.unmatched],
                "unknown_ops": rec.unknown_ops,
                "nms_sites": [s.summary() for s in rec.nms_sites],
                "nms_unmatched": [{"nms": name, **reason.summary()} for name, reason in rec.nms_unmatched]}


def graph_view(model: mio.LoadedModel) -> tuple[Any, list[Any]]:
    """A :class:`GraphView` of ``model`` and its graph output values."""
    if model.kind == "fx":
        g = FxGraph(model.ep.module())
        out_node = next(n for n in g.graph.nodes if n.op == "output")
        import torch
        outputs = [v for v in torch.utils._pytree.tree_leaves(out_node.args[0])]
        return g, outputs
    g = OnnxGraph(model.onnx)
    return g, list(model.onnx.graph.outputs)


def inspect(model: Any, example_inputs: Any = None, trust_remote_code: bool | None = None) -> InspectReport:
    """Recognize attention sites, classifier heads and unmatched softmax nodes (with reasons) in ``model``.
    ``trust_remote_code``: see :func:`rewrite.io.load_model` (docs/security.md)."""
    loaded = mio.load_model(model, example_inputs, trust_remote_code=trust_remote_code)
    with mio.paused_gc():
        g, outputs = graph_view(loaded)
        rec = recognize(g, outputs)
    return InspectReport(source=loaded.source, kind=loaded.kind, recognition=rec,
                         node_count=sum(1 for _ in g.nodes()))


@dataclass
class ConvertResult:
    model: mio.LoadedModel
    report: dict[str, Any] = field(default_factory=dict)


#: Family flags of :func:`convert` (and ``softswap convert``): flag → (pass name template, option carrying the
#: flag's value or None). ``--head svm`` runs ``head.svm``; ``--soft-nms gaussian`` runs ``detect.soft_nms`` with
#: ``method=gaussian``.
FAMILY_FLAGS: dict[str, tuple[str, str | None]] = {
    "head": ("head.{}", None),
    "soft_nms": ("detect.soft_nms", "method"),
    "ood": ("ood.{}", None),
    "binarize": ("binarize.{}", None),
}
#: What each pass family rewrites, for the "nothing was rewritten" error.
_SITE_NOUNS = {"attention": "attention site", "head": "classifier head", "detect": "NonMaxSuppression node",
               "ood": "feature tap", "binarize": "attention site to binarize"}
#: Passes that learn from ``--fit DATA`` (pass-name prefixes); they receive it as ``fit=FitData``.
FIT_FAMILIES = ("head.", "ood.")


def _build_passes(attention: str | None, passes: Sequence[str] | None, options: Mapping[str, Any] | None,
                  layers: Any, keep_softmax: Any, families: Mapping[str, str | None] | None = None,
                  fit: Any = None) -> list[Any]:
    """The passes to run, in order: ``passes``, the attention variant, then the family flags (``head``, ``soft_nms``,
    ``ood``, ``binarize``). ``options`` go to the one pass that takes options; ``layers`` selects attention sites, or
    the OOD feature taps when ``ood`` is given without ``attention``."""
    names = list(passes or [])
    preset: dict[str, dict[str, Any]] = {}
    if attention:
        names.append(attention if attention.startswith("attention.") else f"attention.{attention}")
    for flag, value in (families or {}).items():
        if value is None:
            continue
        if flag not in FAMILY_FLAGS:
            raise OptionError(f"unknown pass family {flag!r}; known: {', '.join(FAMILY_FLAGS)}")
        template, carried = FAMILY_FLAGS[flag]
        name = template.format(value)
        names.append(name)
        if carried is not None:
            preset[name] = {carried: value}
    if not names:
        raise OptionError("nothing to do: give --attention VARIANT, --head, --soft-nms, --ood, --binarize or "
                          "--passes NAME[,NAME]")
    if options and len(names) > 1:
        raise OptionError(f"--option is ambiguous with several passes ({', '.join(names)}); run one pass per convert "
                          "when giving options")
    ood_layers = any(n.startswith("ood.") for n in names) and not any(n.startswith("attention.") for n in names)
    built = []
    for name in names:
        kwargs: dict[str, Any] = {}
        merged = {**preset.get(name, {}), **dict(options or {})}
        if name.startswith("attention."):
            kwargs = {"options": merged, "layers": layers, "keep_softmax": keep_softmax}
        elif merged:
            kwargs = {"options": merged}
        if name.startswith(FIT_FAMILIES):
            kwargs["fit"] = fit
        if name.startswith("ood.") and ood_layers and layers is not None:
            kwargs["layers"] = layers
        built.append(get_pass(name, **kwargs))
    if fit is not None and not any(n.startswith(FIT_FAMILIES) for n in names):
        raise OptionError(f"--fit is used by --head and --ood passes; none of {', '.join(names)} learns from data")
    return built


def input_shapes(model: mio.LoadedModel) -> dict[str, tuple[Any, ...] | None]:
    """Each user input's shape (ints where fixed, None or a symbol where free)."""
    if model.kind == "onnx":
        return {v.name: (tuple(d if isinstance(d, int) else None for d in v.shape) if v.shape is not None else None)
                for v in model.onnx.graph.inputs}
    import torch
    out: dict[str, tuple[Any, ...] | None] = {}
    user = set(model.input_names)
    for node in model.ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            out[node.name] = (tuple(d if isinstance(d, int) else None for d in val.shape)
                              if isinstance(val, torch.Tensor) else None)
    return out


def convert(model: Any, out: str | os.PathLike[str] | None = None, *, attention: str | None = None,
            passes: Sequence[str] | None = None, options: Mapping[str, Any] | None = None, layers: Any = None,
            keep_softmax: Any = None, example_inputs: Any = None, verify: bool = True,
            report_path: str | os.PathLike[str] | None = None, dump_dir: str | None = None,
            trust_remote_code: bool | None = None, head: str | None = None, soft_nms: str | None = None,
            ood: str | None = None, binarize: str | None = None, fit: Any = None, decode: bool = False,
            params: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[mio.LoadedModel, dict[str, Any]]:
    """Rewrite ``model`` with the given passes; optionally write it to ``out`` (``.onnx`` or ``.pt2``).

    ``head`` (``svm``, ``zloss``, ``fourier``), ``soft_nms`` (``linear``, ``gaussian``, ``hard``), ``ood``
    (``mahalanobis``) and ``binarize`` (``bivit``) add the passes of those families; ``fit`` is their data: an
    ``.npz`` path, a mapping of arrays or a :class:`~rewrite.fit_data.FitData` (see :mod:`rewrite.fit_data`).
    Returns (rewritten model, report). The report has the per-site rows of every pass and, with ``verify``, the
    model-level fidelity against the original (outputs a pass adds are listed, not compared). Raises
    :class:`NoSitesError` (and writes nothing) when no site was replaced.

    ``decode=True`` (causal LMs, ``attention`` ``linear`` or ``mala``): ``out`` is a folder that receives ``prefill.onnx``,
    ``step.onnx`` and ``decode.json`` (:func:`passes.decode.export_decode`); ``params`` are per-site parameters
    (e.g. from a ``softswap transfer`` checkpoint). Non-causal models, unsupported families and variants without a
    decode form are refused with one line and nothing written.
    """
    if decode:
        return _convert_decode(model, out, attention=attention, options=options, params=params, verify=verify,
                               report_path=report_path, trust_remote_code=trust_remote_code,
                               others={"passes": passes, "layers": layers, "keep_softmax": keep_softmax, "head": head,
                                       "soft_nms": soft_nms, "ood": ood, "binarize": binarize, "fit": fit,
                                       "dump_dir": dump_dir})
    out_path = mio.check_output_path(out) if out is not None else None
    if report_path is not None:
        mio.check_output_path(report_path, (".json",))
    if dump_dir is not None and Path(dump_dir).exists() and not Path(dump_dir).is_dir():
        raise OutputPathError(f"{dump_dir}: --dump-ir must be a folder; a file of that name exists")
    loaded = mio.load_model(model, example_inputs, trust_remote_code=trust_remote_code)
    if out_path is not None and out_path.exists() and str(out_path.resolve()) == str(Path(loaded.source).resolve()):
        raise OutputPathError(f"{out_path}: output would overwrite the input model")
    if out_path is not None and out_path.suffix == ".pt2" and loaded.kind == "onnx":
        raise OutputPathError(f"{out_path}: an ONNX model can only be written as .onnx")
    fit_data = None
    if fit is not None:
        from .fit_data import load_fit_data
        fit_data = load_fit_data(fit, loaded.input_names, input_shapes(loaded))
    families = {"head": head, "soft_nms": soft_nms, "ood": ood, "binarize": binarize}
    manager = PassManager(_build_passes(attention, passes, options, layers, keep_softmax, families, fit_data),
                          dump_dir)
    rewritten, records = manager.run(loaded)
    report: dict[str, Any] = {"model": loaded.source, "graph": loaded.kind,
                              "passes": [{"name": r.name, "modified": r.modified, "seconds": round(r.seconds, 3),
                                          **r.report} for r in records]}
    if not any(r.modified for r in records):
        reasons = [f"{s['name']}: {s['reason']}" for r in records for s in r.report.get("sites", [])]
        nouns = sorted({_SITE_NOUNS.get(r.name.split(".")[0], f"{r.name} site") for r in records})
        why = "; ".join(reasons) if reasons else f"the model has no {' or '.join(nouns)}"
        raise NoSitesError(f"{loaded.source}: nothing was rewritten ({why}); no output written")
    if verify:
        # outputs a pass changes on purpose (e.g. Soft-NMS keeps a different set of boxes) are listed, not compared
        changed = [name for r in records for name in r.report.get("changed_outputs", [])]
        vr = _verify(loaded, rewritten, changed=changed)
        report["fidelity"] = vr.to_dict()
    if out_path is not None:
        export(rewritten, out_path)
        report["output"] = str(out_path)
    if report_path is not None:
        from .atomic import write_text
        write_text(report_path, json.dumps(report, indent=1, default=str))
    return rewritten, report


def _convert_decode(model: Any, out: Any, *, attention: str | None, options: Mapping[str, Any] | None,
                    params: Any, verify: bool, report_path: Any, trust_remote_code: bool | None,
                    others: Mapping[str, Any]) -> tuple[mio.LoadedModel, dict[str, Any]]:
    """``convert(..., decode=True)``: the decode export of the catalogue (``passes.decode``)."""
    given = sorted(k for k, v in others.items() if v not in (None, [], ()))
    if given:
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        raise OptionError(f"--decode takes --attention, --option and --params only; not {flags}")
    if out is None:
        raise OutputPathError("--decode needs an output folder (-o OUT_DIR)")
    if report_path is not None:
        mio.check_output_path(report_path, (".json",))
    from .passes import get_exporter  # the catalogue's decode exporter (passes.decode), registered as a plugin
    converted, report = get_exporter("decode")(model, out, attention=attention, options=options, params=params,
                                      trust_remote_code=trust_remote_code, verify=verify)
    if report_path is not None:
        from .atomic import write_text
        write_text(report_path, json.dumps(report, indent=1, default=str))
    return converted, report


def export(model: mio.LoadedModel, out: str | os.PathLike[str]) -> Path:
    """Write ``model`` as ``.onnx`` (FX programs are exported with the torch dynamo exporter) or ``.pt2``."""
    path = mio.check_output_path(out)
    if path.suffix == ".pt2":
        if model.kind != "fx":
            raise OutputPathError(f"{path}: an ONNX model can only be written as .onnx")
        return mio.save_pt2(model.ep, path)
    onnx_model = model.onnx if model.kind == "onnx" else mio.fx_to_onnx(model)
    return mio.save_onnx(onnx_model, path)


def verify(original: Any, rewritten: Any, inputs: Mapping[str, Any] | None = None, seed: int = 0,
           trust_remote_code: bool | None = None) -> VerifyReport:
    """Compare two models (any kinds) on the same named inputs."""
    a = mio.load_model(original, trust_remote_code=trust_remote_code)
    b = mio.load_model(rewritten, trust_remote_code=trust_remote_code)
    if inputs is None and not a.example_inputs and b.example_inputs:
        from .verify import default_inputs
        inputs = default_inputs(b, seed)
    return _verify(a, b, inputs, seed)
