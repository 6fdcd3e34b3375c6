"""Decode export: a causal LM converted to linear attention as two ONNX graphs and a manifest.

``OUT_DIR/prefill.onnx``: (input_ids, positions) → (logits, next_state.{i}.S, next_state.{i}.z for every layer i);
``OUT_DIR/step.onnx``: (input_ids (B, 1), positions (B, 1), state.{i}.S, state.{i}.z) → (logits (B, 1, vocab),
next_state.{i}.S, next_state.{i}.z) (names: :mod:`passes.decode.graphs`);
(with the hybrid window W, each layer's state adds the last W keys/values and their slot mask:
:mod:`passes.decode.state`); ``OUT_DIR/decode.json``: the manifest (family, variant and options, window, vocabulary
size, eos/bos ids, the state names and shapes, the maximum position); tokenizer files are copied beside them when
the model folder has them.

The attention pass runs first on the model's exported program (recognition, per-site options and parameters: the
same as ``softswap convert``, so parameters given as ``params`` — e.g. from ``softswap transfer`` — carry over);
every site must be causal and replaced, one per layer in order. The graphs then walk the Hugging Face model's own
submodules (:mod:`passes.decode.families`) with the sites' prompt/step forms (:mod:`passes.decode.state`).
Everything is written to a temporary folder first: on any error nothing is written.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from rewrite import io as mio
from rewrite.errors import OptionError, OutputPathError, UnsupportedModelError, first_line
from rewrite.interrupts import reraise_if_interrupted

from .families import adapter_for
from .graphs import PrefillGraph, StepGraph, io_names, state_names
from .state import LinearLayerState

log = logging.getLogger(__name__)

MANIFEST = "decode.json"
FORMAT = "softswap-decode/1"
#: Variants with a decode (recurrent state) form.
DECODE_VARIANTS = ("linear", "mala")
_CAUSAL_MASKS = ("causal", "causal+padding")


def check_output_folder(out_dir: str | os.PathLike[str]) -> Path:
    """OUT_DIR must be a folder (created if missing) whose parent exists. Raises :class:`OutputPathError`."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: --decode writes a folder (prefill.onnx, step.onnx, {MANIFEST}); a file of "
                              "that name exists")
    if path.suffix in (".onnx", ".pt2"):
        raise OutputPathError(f"{path}: --decode writes a folder, not a {path.suffix} file")
    if not path.parent.is_dir():
        raise OutputPathError(f"{path}: parent folder {path.parent} does not exist")
    return path


def _load(model: Any, trust_remote_code: bool | None) -> mio.LoadedModel:
    """A loaded model that still has its Hugging Face module (``extra["hf"]``)."""
    if isinstance(model, torch.nn.Module) and hasattr(model, "config") and not isinstance(model, mio.LoadedModel):
        from rewrite.hf import wrap_hf_model
        hf = wrap_hf_model(model)
        loaded = mio.export_module(hf.module, hf.example_inputs, dynamic_shapes=hf.dynamic_shapes,
                                   source=type(model).__name__, output_names=hf.output_names)
        loaded.extra["hf"] = hf
        return loaded
    loaded = mio.load_model(model, trust_remote_code=trust_remote_code)
    if "hf" not in loaded.extra:
        raise UnsupportedModelError(f"{loaded.source}: --decode needs a Hugging Face causal LM (a model folder or a "
                                    f"transformers model) to build the step graph; got a {loaded.kind} graph")
    return loaded


def _variant_name(attention: str | None) -> str:
    name = (attention or "").removeprefix("attention.")
    if name not in DECODE_VARIANTS:
        raise OptionError(f"--decode: --attention {name or '(none)'} has no decode form; supported: "
                          f"{', '.join(DECODE_VARIANTS)} (the other variants have no constant-size state)")
    return name


def _sites(loaded: mio.LoadedModel, name: str, options: Mapping[str, Any] | None,
           params: Mapping[str, Mapping[str, torch.Tensor]] | None, layers: int) -> tuple[Any, list[Any]]:
    """(the attention pass, the site modules in layer order); refuses models whose sites are not one causal site
    per layer, all replaced."""
    from rewrite.graph.fx import FxGraph
    from rewrite.passes import get_pass
    apass = get_pass(f"attention.{name}", options=dict(options or {}), params=params)
    decisions, _, chosen, modules = apass._plan(FxGraph(loaded.ep.module()), loaded)
    src = loaded.source
    sites = {d.site.name: d.site for d in decisions}
    for site, given in (params or {}).items():
        rec = sites.get(site)
        used = set(apass.variant.init_params(rec.heads, rec.head_dim, apass.variant_options)) if rec else set()
        if rec is None or set(given) - used:
            raise OptionError(f"--decode: parameters {sorted(set(given) - used) or sorted(given)} of site {site} "
                              f"are not used by {apass.name} with options {dict(apass.variant_options)} (give the "
                              "options of the transfer run)")
    if len(decisions) != layers:
        raise UnsupportedModelError(f"{src}: --decode expects one attention site per layer ({layers}); found "
                                    f"{len(decisions)}")
    for d in decisions:
        if not (d.site.causal or d.site.mask in _CAUSAL_MASKS):
            raise UnsupportedModelError(f"{src}: --decode needs a causal model; site {d.site.name} "
                                        f"({d.site.node}) has mask {d.site.mask!r}")
        if not d.replace:
            raise UnsupportedModelError(f"{src}: --decode: site {d.site.name} is not converted ({d.reason})")
    return apass, [(s.name, modules[s.name]) for s in chosen]


def _export_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], dynamic: Any, names: tuple[list[str],
                 list[str]], path: Path, what: str, source: str) -> None:
    """torch.export ``module`` and write it as ONNX with the given input/output names."""
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
        with mio.quiet_stdout():
            prog = torch.onnx.export(ep, (), dynamo=True, opset_version=18, input_names=names[0],
                                     output_names=names[1], verbose=False)
    except Exception as exc:
        reraise_if_interrupted(exc)
        raise UnsupportedModelError(f"{source}: export of the {what} graph failed ({first_line(exc)})") from exc
    model = prog.model
    got = ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs])
    if got != (names[0], names[1]):
        raise UnsupportedModelError(f"{source}: the {what} graph has inputs/outputs {got}, expected {names}")
    mio.save_onnx(model, path)


def export_decode(model: Any, out_dir: str | os.PathLike[str], *, attention: str | None = "linear",
                  options: Mapping[str, Any] | None = None,
                  params: Mapping[str, Mapping[str, torch.Tensor]] | str | os.PathLike[str] | None = None,
                  trust_remote_code: bool | None = None, verify: bool = False
                  ) -> tuple[mio.LoadedModel, dict[str, Any]]:
    """Write ``OUT_DIR/prefill.onnx``, ``step.onnx`` and ``decode.json`` for a causal LM converted to ``attention``.

    ``model``: a Hugging Face folder or a transformers causal LM (GPT-2, Llama/Mistral/Qwen2 style). ``params``:
    per-site parameters by site name (``attnN``) or the path of a ``softswap transfer --checkpoint`` file (read
    weights-only by :func:`passes.transfer.load_checkpoint_params`), else the variant's initial ones. Returns (the
    converted model as ``softswap convert`` makes it with the same parameters, and the report: pass rows, manifest,
    files written; with ``verify`` also the converted model's fidelity against the original as ``convert`` reports
    it). Raises :class:`OptionError`, :class:`UnsupportedModelError` or :class:`OutputPathError` (one line) and
    writes nothing for a variant without a decode form, a non-causal model, an unsupported family or a bad folder.
    """
    out = check_output_folder(out_dir)
    name = _variant_name(attention)
    if isinstance(params, (str, os.PathLike)):
        from passes.transfer import load_checkpoint_params  # a `softswap transfer --checkpoint` file
        params = load_checkpoint_params(params)
    loaded = _load(model, trust_remote_code)
    lm = loaded.extra["hf"].module.model
    adapter = adapter_for(lm, loaded.source).eval()
    apass, site_modules = _sites(loaded, name, options, params, adapter.layers)
    layers = [LinearLayerState(m, adapter.heads, adapter.kv_heads) for _, m in site_modules]
    fitted = {n: {k: v.detach().clone() for k, v in m.params.items()} for n, m in site_modules}
    from rewrite.attention_pass import AttentionRewritePass
    started = time.perf_counter()
    result = AttentionRewritePass(apass.variant, options, params=fitted).run(loaded)
    report: dict[str, Any] = {"model": loaded.source, "graph": loaded.kind,
                              "passes": [{"name": apass.name, "modified": result.modified,
                                          "seconds": round(time.perf_counter() - started, 3),
                                          **result.report}]}
    if verify:
        from rewrite.verify import verify as run_verify
        report["fidelity"] = run_verify(loaded, result.model).to_dict()
    cfg = lm.config
    vocab = int(cfg.vocab_size)
    prefill, step = PrefillGraph(adapter, layers).eval(), StepGraph(adapter, layers).eval()
    parts = layers[0].parts
    names = io_names(adapter.layers, parts)
    from torch.export import Dim
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=2, max=max(2, adapter.max_positions or 1 << 20))
    ids = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(0))  # batch 2: not specialised
    pos = torch.arange(5)[None].repeat(2, 1)
    with torch.no_grad():
        first = prefill(ids, pos)
    states = first[1:]
    state_shapes = [tuple(s.shape[1:]) for s in states]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _export_onnx(prefill, (ids, pos), ({0: batch, 1: seq}, {0: batch, 1: seq}), names["prefill"],
                     tmp / "prefill.onnx", "prefill", loaded.source)
        step_args = (ids[:, -1:], pos[:, -1:] + 1, *states)
        _export_onnx(step, step_args, ({0: batch}, {0: batch}, tuple({0: batch} for _ in states)), names["step"],
                     tmp / "step.onnx", "step", loaded.source)
        manifest = {
            "format": FORMAT, "family": adapter.family, "architecture": type(lm).__name__, "variant": name,
            "options": {k: v for k, v in apass.variant_options.items()}, "layers": adapter.layers,
            "window": int(apass.variant_options.get("window", 0) or 0),
            "heads": adapter.heads, "kv_heads": adapter.kv_heads, "head_dim": adapter.head_dim,
            "vocab_size": vocab, "eos_token_id": getattr(cfg, "eos_token_id", None),
            "bos_token_id": getattr(cfg, "bos_token_id", None), "max_positions": adapter.max_positions or None,
            "prefill_min_tokens": 2, "graphs": {"prefill": "prefill.onnx", "step": "step.onnx"},
            "inputs": {g: n[0] for g, n in names.items()}, "outputs": {g: n[1] for g, n in names.items()},
            "state": [{"name": n, "output": o, "shape": ["batch", *shape], "dtype": "float32"}
                      for n, o, shape in zip(state_names(adapter.layers, parts),
                                             state_names(adapter.layers, parts, "next_state"), state_shapes)],
            "tokenizer": False,
        }
        tok = loaded.extra["hf"].tokenizer_path
        if tok is not None:
            for f in Path(tok).iterdir():
                if f.is_file() and ("token" in f.name or f.name in ("vocab.json", "merges.txt", "vocab.txt",
                                                                      "special_tokens_map.json")):
                    shutil.copy2(f, tmp / f.name)
                    manifest["tokenizer"] = True
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        out.mkdir(exist_ok=True)
        written = []
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):  # the manifest last
            os.replace(f, out / f.name)
            written.append(str(out / f.name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.update({"decode": manifest, "files": written, "output": str(out)})
    log.info("decode export: %s → %s (%d layers, state %s per layer)", loaded.source, out, adapter.layers,
             state_shapes[:2])
    return result.model, report
