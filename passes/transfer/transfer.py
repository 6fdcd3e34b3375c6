"""Layer-wise attention transfer for FX programs and ONNX graphs.

Flow of :func:`transfer`:

1. load the model (:func:`rewrite.io.load_model`), recognize its attention sites and choose the ones the
   ``attention.<variant>`` pass would replace (``layers`` / ``keep_softmax`` / mask support);
2. read calibration data (:mod:`.data`) and split it into train and held-out batches;
3. for each group of sites, capture (q, k, v, mask values, softmax output) on every batch — FX by running the
   program (:func:`rewrite.capture.capture_fx`), ONNX in onnxruntime (:func:`rewrite.capture.capture_onnx`);
4. fit each site's :class:`rewrite.binding.SiteModule` parameters independently (:mod:`.fit`), checkpointing
   per-site params, step counters and optimizer state to ``checkpoint`` (``torch.save``) so a run can resume;
5. write the fitted params into the graph with ``AttentionRewritePass(params=...)`` and report site fidelity on
   held-out batches before / after fitting, and model fidelity (:func:`rewrite.verify.verify` on the held-out
   batches) for the untrained swap and the fitted model.

Memory is bounded by ``sites_per_capture`` (the captures of at most that many sites are alive at once).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from rewrite import io as mio
from rewrite.attention_pass import AttentionRewritePass
from rewrite.binding import site_module
from rewrite.capture import capture_fx, capture_onnx
from rewrite.errors import NoSitesError, OptionError, SoftswapError
from rewrite.recognize import recognize
from rewrite.verify import compare, runner

from .data import Batch, Calibration, load_calibration
from .fit import FitConfig, SiteState, fit_site

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "softswap-transfer/1"
#: Steps per site when neither ``steps`` nor ``minutes`` is given (docs/transfer.md: budget and s/step).
DEFAULT_STEPS = 1500
#: Text lines read for calibration by default (20 % of them held out).
DEFAULT_MAX_SAMPLES = 1024
#: Variants whose transfer default is the learnable Hedgehog feature map.
HEDGEHOG_DEFAULT = ("linear", "mala")


class TransferError(SoftswapError):
    """Attention transfer cannot proceed (names the checkpoint, site or variant at fault)."""


# ------------------------------------------------------------------------------------------------------------
def transfer_options(variant: Any, options: Mapping[str, Any] | None, hybrid_window: int) -> dict[str, Any]:
    """The variant options used for transfer: ``options`` overlaid on the transfer defaults
    (``feature_map="hedgehog"`` for linear/MALA; ``window=hybrid_window`` when > 0)."""
    opts: dict[str, Any] = {}
    names = {o.name for o in variant.options}
    if variant.name in HEDGEHOG_DEFAULT and "feature_map" in names:
        opts["feature_map"] = "hedgehog"
    if hybrid_window:
        if "window" not in names:
            raise OptionError(f"--hybrid-window: variant {variant.name!r} has no sliding-window hybrid "
                              "(only linear and mala do)")
        if hybrid_window < 0:
            raise OptionError(f"--hybrid-window must be >= 0, got {hybrid_window}")
        opts["window"] = int(hybrid_window)
    opts.update(dict(options or {}))
    return opts


def _graph(loaded: mio.LoadedModel) -> tuple[Any, Any, Any]:
    """(graph view, runnable: fx.GraphModule or onnx_ir.Model, model) as the rewrite pass will see them."""
    if loaded.kind == "fx":
        from rewrite.graph.fx import FxGraph
        gm = loaded.ep.module()
        return FxGraph(gm), gm, gm
    from rewrite import emit_onnx
    from rewrite.graph.onnx_graph import OnnxGraph
    model = loaded.onnx.clone()
    if model.opset_imports.get("", 17) < 18:
        model = emit_onnx.upgrade_opset(model, 18)
    return OnnxGraph(model), model, model


def _capture(loaded: mio.LoadedModel, runnable: Any, sites: Sequence[Any], batch: Batch
             ) -> dict[str, list[torch.Tensor]]:
    if loaded.kind == "fx":
        leaves = [torch.from_numpy(np.array(batch[n])) for n in loaded.input_names]
        args, kwargs = torch.utils._pytree.tree_unflatten(leaves, loaded.ep.call_spec.in_spec)
        values = capture_fx(runnable, sites, args, kwargs)
    else:
        values = capture_onnx(runnable, sites, batch, source=loaded.source)
    # contiguous: a value has the same layout (and the fits the same bits) whether this process captured it or
    # another rank sent it (.capture_split)
    return {name: [v.contiguous() if isinstance(v, torch.Tensor) else v for v in vals]
            for name, vals in values.items()}


def _outputs(model: mio.LoadedModel, batches: Sequence[Batch]) -> list[dict[str, np.ndarray]]:
    """``model``'s outputs on each batch (its module built once, not per batch)."""
    call = runner(model)
    return [call(batch) for batch in batches]


def _fidelity_of(reference: Sequence[Mapping[str, np.ndarray]], candidate: Sequence[Mapping[str, np.ndarray]]
                 ) -> dict[str, Any]:
    """Per-output cosine / relative error (rewrite.verify.compare) averaged over paired per-batch outputs."""
    per: dict[str, dict[str, list[float]]] = {}
    for ref, cand in zip(reference, candidate, strict=True):
        for o in compare(ref, cand):
            d = per.setdefault(o.name, {"cosine": [], "rel_error": []})
            d["cosine"].append(o.cosine)
            d["rel_error"].append(o.rel_error)
    outputs = {n: {k: float(np.mean(v)) for k, v in d.items()} for n, d in per.items()}
    return {"outputs": outputs, "min_cosine": min((o["cosine"] for o in outputs.values()), default=1.0),
            "batches": len(reference)}


def _model_fidelity(original: mio.LoadedModel, rewritten: mio.LoadedModel, batches: Sequence[Batch]
                    ) -> dict[str, Any]:
    """Per-output cosine / relative error of ``rewritten`` against ``original``, averaged over ``batches``."""
    return _fidelity_of(_outputs(original, batches), _outputs(rewritten, batches))


def _rewrite(loaded: mio.LoadedModel, variant: Any, options: Mapping[str, Any], layers: Any, keep_softmax: Any,
             params: Mapping[str, Mapping[str, torch.Tensor]] | None) -> tuple[mio.LoadedModel, dict[str, Any]]:
    """One attention pass writing every site's fitted params (FX parameters or ONNX initializers)."""
    result = AttentionRewritePass(variant, options=options, layers=layers, keep_softmax=keep_softmax,
                                  measure=False, params=params).run(loaded)
    if not result.modified:
        reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in result.report.get("sites", []))
        raise NoSitesError(f"{loaded.source}: nothing was rewritten ({reasons or 'no attention site'})")
    return result.model, result.report


def rewrite_with_params(model: Any, params: Mapping[str, Mapping[str, torch.Tensor]], *, attention: str = "linear",
                        options: Mapping[str, Any] | None = None, hybrid_window: int = 0, layers: Any = None,
                        keep_softmax: Any = None) -> mio.LoadedModel:
    """Rewrite ``model`` (FX or ONNX) with ``attention`` and write fitted per-site ``params`` into the graph.

    ``options`` / ``hybrid_window`` are completed exactly as :func:`transfer` does (:func:`transfer_options`), so
    params fitted on one conversion of a model (e.g. FX) can be written into another (e.g. its ONNX export).
    """
    from passes.attention import get_variant
    try:
        variant = get_variant(attention)
    except KeyError as exc:
        raise OptionError(str(exc.args[0])) from None
    opts = transfer_options(variant, options, hybrid_window)
    return _rewrite(mio.load_model(model), variant, opts, layers, keep_softmax, params)[0]


# ------------------------------------------------------------------------------------------------------------
class _Checkpoint:
    """Per-site states in one ``torch.save`` file, written atomically (tmp + rename)."""

    def __init__(self, path: str | os.PathLike[str] | None, meta: dict[str, Any],
                 write_path: str | os.PathLike[str] | None = None) -> None:
        # Distributed runs (.distributed): each rank writes its own shard (write_path); reading merges the file
        # and every shard by site (.shards). A single-process run folds the shards into ``path`` on its first save.
        from .shards import shard_files
        self.path = Path(path) if path is not None else None
        self.write_path = Path(write_path) if write_path is not None else self.path
        self.meta = meta
        self.sites: dict[str, SiteState] = {}
        self._fold_shards = False
        if self.path is not None and (self.path.exists() or shard_files(self.path)):
            self._load()

    def _load(self) -> None:
        from .shards import shard_files
        shards = shard_files(self.path)
        self._fold_shards = bool(shards) and self.write_path == self.path
        for file in ([self.path] if self.path.exists() else []) + shards:
            data = _read_checkpoint(file)
            for key in ("variant", "options", "seed"):
                if data["meta"].get(key) != self.meta.get(key):
                    raise TransferError(f"{file}: checkpoint was made with {key}={data['meta'].get(key)!r}, "
                                        f"this run has {key}={self.meta.get(key)!r}; use another --checkpoint")
            for k, v in data["sites"].items():
                state = SiteState.from_dict(v)
                if k not in self.sites or state.step > self.sites[k].step:
                    self.sites[k] = state
        log.info("resuming from %s: %s", self.path, {k: s.step for k, s in self.sites.items()})

    def save(self) -> None:
        if self.write_path is None:
            return
        from rewrite.atomic import atomic_output
        with atomic_output(self.write_path) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, "meta": self.meta,
                        "sites": {k: s.to_dict() for k, s in self.sites.items()}}, tmp)
        if self._fold_shards:
            from .shards import remove_shards
            remove_shards(self.path)
            self._fold_shards = False


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), disable=not enabled,
                    transient=False)


def _canonical_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in options.items()}


# ------------------------------------------------------------------------------------------------------------
def fit_params(model: Any, *, attention: str = "linear", options: Mapping[str, Any] | None = None,
               hybrid_window: int = 0, data: Any = None, steps: int | None = None, minutes: float | None = None,
               seed: int = 0, layers: Any = None, keep_softmax: Any = None,
               checkpoint: str | os.PathLike[str] | None = None, progress: bool = True, example_inputs: Any = None,
               batch_size: int = 16, max_samples: int | None = DEFAULT_MAX_SAMPLES, max_length: int = 128, lr: float = 1e-2,
               scalar_lr: float = 1e-1, sites_per_capture: int | None = None, tokenizer: Any = None,
               threads: int | None = 1, attention_ce: float = 0.0, shard: Any = None,
               max_memory: int | None = None, capture_dir: str | os.PathLike[str] | None = None
               ) -> tuple[mio.LoadedModel, Calibration, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Steps 1–4 of :func:`transfer` without writing the graph: (loaded model, calibration, fitted per-site params,
    report). Arguments as for :func:`transfer`. ``report["sites"]`` holds the per-site before/after fidelity.

    ``threads``: torch intra-op threads while capturing and fitting (restored afterwards; None = leave as is).
    The per-site tensors are small, so one thread is usually fastest, especially on a shared machine.
    ``shard``: a :class:`passes.transfer.distributed.Shard` (this process is one rank of a distributed run: it fits
    only its share of the sites, checkpoints to its own shard file, and rank 0 gathers every rank's params and rows).
    ``max_memory``: bytes of captured activations kept in RAM; beyond it captures spill to disk
    (:mod:`.capture_store`, a temporary folder under ``capture_dir``, removed afterwards). None = all in RAM.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _fit_params(model, attention=attention, options=options, hybrid_window=hybrid_window, data=data,
                           steps=steps, minutes=minutes, seed=seed, layers=layers, keep_softmax=keep_softmax,
                           checkpoint=checkpoint, progress=progress, example_inputs=example_inputs,
                           batch_size=batch_size, max_samples=max_samples, max_length=max_length, lr=lr,
                           scalar_lr=scalar_lr, sites_per_capture=sites_per_capture, tokenizer=tokenizer,
                           attention_ce=attention_ce, shard=shard, max_memory=max_memory, capture_dir=capture_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _fit_params(model: Any, *, attention: str, options: Mapping[str, Any] | None, hybrid_window: int, data: Any,
                steps: int | None, minutes: float | None, seed: int, layers: Any, keep_softmax: Any,
                checkpoint: str | os.PathLike[str] | None, progress: bool, example_inputs: Any, batch_size: int,
                max_samples: int | None, max_length: int, lr: float, scalar_lr: float,
                sites_per_capture: int | None, tokenizer: Any, attention_ce: float = 0.0, shard: Any = None,
                max_memory: int | None = None, capture_dir: str | os.PathLike[str] | None = None
                ) -> tuple[mio.LoadedModel, Calibration, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    from passes.attention import get_variant

    from .phases import PhaseClock
    t0 = time.time()
    clock = PhaseClock()  # report["phases"]: wall seconds per phase (.phases)
    _check_numbers(steps=steps, minutes=minutes, batch_size=batch_size, max_samples=max_samples,
                   max_length=max_length, lr=lr, scalar_lr=scalar_lr, hybrid_window=hybrid_window,
                   attention_ce=attention_ce)
    if checkpoint is not None:
        _check_checkpoint_path(checkpoint)
    try:
        variant = get_variant(attention)
    except KeyError as exc:
        raise OptionError(str(exc.args[0])) from None
    opts = transfer_options(variant, options, hybrid_window)
    rewrite_pass = AttentionRewritePass(variant, options=opts, layers=layers, keep_softmax=keep_softmax,
                                        measure=False)
    with clock("load"):
        loaded = mio.load_model(model, example_inputs)
        g, runnable, _ = _graph(loaded)
        sites = recognize(g).attention_sites
    decisions = rewrite_pass.decide(sites)
    chosen = [d.site for d in decisions if d.replace]
    if not chosen:
        reasons = "; ".join(f"{d.site.name}: {d.reason}" for d in decisions)
        raise NoSitesError(f"{loaded.source}: nothing to transfer ({reasons or 'no attention site'})")
    resolved = rewrite_pass._options_for(loaded)  # fills n_ref etc. exactly as the pass will
    with clock("calibration"):
        calib = load_calibration(loaded, data, batch_size=batch_size, max_length=max_length,
                                 max_samples=max_samples, tokenizer=tokenizer, seed=seed)
    if steps is None and minutes is None:
        steps = DEFAULT_STEPS
    config = FitConfig(lr=lr, scalar_lr=scalar_lr, lambda_ce=float(attention_ce))
    meta = {"variant": variant.name, "options": _canonical_options(resolved), "seed": seed}
    ckpt = _Checkpoint(checkpoint, meta,
                       write_path=shard.checkpoint_path(checkpoint) if shard is not None and checkpoint else None)
    torch.manual_seed(seed)
    # --- distributed hook (.distributed): this rank fits its share of the sites, balanced by parameter count
    all_chosen = chosen
    if shard is not None:
        chosen = shard.select(chosen, [_n_init_params(variant, s, resolved) for s in chosen])
    # --- memory-bounded capture hook (.capture_store): captures beyond max_memory bytes go to disk
    from .capture_store import CaptureStore
    from .capture_store import evaluate as _evaluate
    store = CaptureStore(max_memory, capture_dir if capture_dir is not None else
                         (Path(checkpoint).parent if checkpoint is not None else None))

    site_rows: dict[str, dict[str, Any]] = {}
    fitted: dict[str, dict[str, torch.Tensor]] = {}
    deadline_all = t0 + 60.0 * minutes if minutes is not None else None
    group = max(1, sites_per_capture or len(chosen))
    index_of = {s.name: i for i, s in enumerate(sites)}
    # with ranks (gloo: CPU tensors; all of a rank's sites captured at once) each rank runs its share of the
    # batches and the ranks swap site values (.capture_split); else every rank runs every batch for its own sites
    split = shard is not None and shard.world > 1 and sites_per_capture is None and shard.backend == "gloo"
    with store, _progress(progress) as bar:
        captured = None
        if split:
            from .capture_split import capture_split
            owners = shard.site_ranks
            captured = ({s.name: store.samples() for s in chosen}, {s.name: store.samples() for s in chosen})
            with clock("capture"):
                ran = sum(capture_split(batches, lambda b: _capture(loaded, runnable, all_chosen, b), owners, shard,
                                        lambda name, values, _into=into: _into[name].append(values))
                          for batches, into in zip((calib.train, calib.held_out), captured))
            shard.capture = {"split": True, "batches_run": ran,
                             "batches": len(calib.train) + len(calib.held_out)}
        elif shard is not None and shard.world > 1:
            shard.capture = {"split": False, "why": "--sites-per-capture is set" if sites_per_capture is not None
                             else f"{shard.backend} ranks (the split exchanges CPU tensors over gloo)"}
        for start in range(0, len(chosen), group):
            part = chosen[start:start + group]
            if captured is not None:
                train, held = captured
            else:
                train = {s.name: store.samples() for s in part}
                held = {s.name: store.samples() for s in part}
                with clock("capture"):
                    for batch in calib.train:
                        for name, tensors in _capture(loaded, runnable, part, batch).items():
                            train[name].append(tensors)
                    for batch in calib.held_out:
                        for name, tensors in _capture(loaded, runnable, part, batch).items():
                            held[name].append(tensors)
            fit_start = time.perf_counter()
            for pos, site in enumerate(part):
                remaining = len(chosen) - (start + pos)
                init = None
                if variant.init_params is not None and site.heads and site.head_dim:
                    init = variant.init_params(site.heads, site.head_dim, resolved)
                init = init or {}
                state = ckpt.sites.get(site.name) or SiteState(params={k: v.clone() for k, v in init.items()})
                torch.manual_seed(site_seed(seed, index_of[site.name]))  # rank-independent per-site RNG
                module = site_module(variant, site, g, resolved, init)
                before = _evaluate(module, held[site.name])
                for k, v in state.params.items():
                    module.params[k].data.copy_(v)
                deadline = None
                if deadline_all is not None:
                    deadline = time.time() + max(0.0, deadline_all - time.time()) / remaining
                task = bar.add_task(site.name, total=steps if steps is not None else None, completed=state.step,
                                    loss="-")

                def on_step(step: int, loss: float, _task: Any = task) -> None:
                    bar.update(_task, completed=step, loss=f"{loss:.4g}")

                def on_save(st: SiteState, _name: str = site.name) -> None:
                    ckpt.sites[_name] = st
                    ckpt.save()

                state = fit_site(module, train[site.name], state, total_steps=steps, deadline=deadline, seed=seed,
                                 site_index=index_of[site.name], config=config, on_step=on_step, on_save=on_save,
                                 split=shard.split_for(site.name) if shard is not None else None)
                ckpt.sites[site.name] = state
                ckpt.save()
                after = _evaluate(module, held[site.name])
                fitted[site.name] = {k: v.detach().clone() for k, v in state.params.items()}
                site_rows[site.name] = {"before": before, "after": after, "steps": state.step,
                                        "seconds": round(state.seconds, 3), "params": sorted(state.params),
                                        "n_params": int(sum(v.numel() for v in state.params.values())),
                                        "losses": state.losses[-20:]}
                if not state.params:
                    site_rows[site.name]["note"] = "variant has no learnable parameters with these options"
                log.info("%s: site cosine %.4f -> %.4f (%d steps)", site.name, before["cosine"], after["cosine"],
                         state.step)
                if shard is not None:
                    shard.site_done(site.name)
            clock.add("fit", time.perf_counter() - fit_start)
            del train, held
    if shard is not None:  # rank 0 receives every rank's params and rows (in site order); the others get {}
        with clock("gather"):
            fitted, site_rows = shard.gather(fitted, site_rows, [s.name for s in all_chosen])
        if shard.writes and checkpoint is not None:
            _Checkpoint(checkpoint, meta).save()  # fold the ranks' shards into the one checkpoint file
    report: dict[str, Any] = {
        "model": loaded.source, "graph": loaded.kind, "variant": variant.name,
        "options": _canonical_options(resolved), "seed": seed, "steps": steps, "minutes": minutes,
        "attention_ce": float(attention_ce),
        "data": calib.describe(), "sites": site_rows,
        "skipped": {d.site.name: d.reason for d in decisions if not d.replace},
        "fit_seconds": round(time.time() - t0, 2), "checkpoint": str(checkpoint) if checkpoint else None,
        "lines": [calib.warning] if calib.warning else [],
        "phases": clock.as_dict(),
    }
    if store.spilled:
        report["capture"] = store.describe()
    if shard is not None:
        report["distributed"] = shard.describe()
    return loaded, calib, fitted, report


def _export_to(model: mio.LoadedModel, out_path: Path) -> None:
    """Write ``model`` to ``out_path`` (.onnx or .pt2, :func:`rewrite.api.export`)."""
    from rewrite.api import export
    export(model, out_path)


def site_seed(seed: int, site_index: int) -> int:
    """The torch seed of one site's fit: a pure function of (seed, site index), so it does not depend on which
    rank fits the site or in which order."""
    return (int(seed) * 1_000_003 + int(site_index) * 7_919 + 17) % (2 ** 63)


def _n_init_params(variant: Any, site: Any, resolved: Mapping[str, Any]) -> int:
    """Learnable scalars of ``site``'s replacement (from ``variant.init_params``); 0 when it has none."""
    if variant.init_params is None or not site.heads or not site.head_dim:
        return 0
    return int(sum(v.numel() for v in (variant.init_params(site.heads, site.head_dim, resolved) or {}).values()))


def transfer(model: Any, out: str | os.PathLike[str] | None = None, *, attention: str = "linear",
             options: Mapping[str, Any] | None = None, hybrid_window: int = 0, data: Any = None,
             steps: int | None = None, minutes: float | None = None, seed: int = 0, layers: Any = None,
             keep_softmax: Any = None, checkpoint: str | os.PathLike[str] | None = None, progress: bool = True,
             example_inputs: Any = None, batch_size: int = 16, max_samples: int | None = DEFAULT_MAX_SAMPLES,
             max_length: int = 128, lr: float = 1e-2, scalar_lr: float = 1e-1,
             sites_per_capture: int | None = None, measure_model: bool = True, tokenizer: Any = None,
             report_path: str | os.PathLike[str] | None = None, threads: int | None = 1,
             stage2_steps: int | None = None, stage2_rank: int = 8,
             stage2_lr: float = 1e-3, attention_ce: float = 0.0, shard: Any = None,
             max_memory: int | None = None) -> tuple[mio.LoadedModel, dict[str, Any]]:
    """Replace softmax attention with ``attention`` and fit the replacement's parameters per site.

    Args:
        model: anything :func:`rewrite.io.load_model` accepts (path, HF folder, nn.Module + ``example_inputs``,
            ExportedProgram, ONNX model, LoadedModel).
        out: write the fitted model here (``.onnx`` or ``.pt2``) when given.
        attention: variant name (``linear``, ``mala``, ``sigmoid``, ``softplus``, ...).
        options: variant options; the transfer defaults are ``feature_map="hedgehog"`` (linear, MALA).
        hybrid_window: > 0 sets the sliding softmax window ``window`` (linear and MALA).
        data: calibration data (see :func:`passes.transfer.data.load_calibration`); None = synthetic.
        steps: optimizer steps per site (total, counting steps already in the checkpoint).
        minutes: wall-clock budget for capture + fitting (split evenly over the sites still to fit). With neither
            ``steps`` nor ``minutes``, ``DEFAULT_STEPS`` steps per site.
        seed: seeds torch and the per-site batch order; equal seeds give identical params.
        layers / keep_softmax: site selection, as for ``softswap convert``.
        checkpoint: ``torch.save`` file with per-site params, step counters and optimizer state; an existing
            file is resumed (it must have the same variant, options and seed).
        progress: show a rich progress bar.
        batch_size, max_samples, max_length, tokenizer: calibration data shaping (text / synthetic).
        lr, scalar_lr: Adam learning rates for matrices and per-head scalars.
        sites_per_capture: capture at most this many sites per pass over the data (bounds memory); None = all.
        threads: torch threads while capturing, fitting and in stage 2 (default 1; None = unchanged).
        stage2_steps, stage2_rank, stage2_lr: LoLCATs stage 2 (:mod:`.stage2`): that many Adam steps of
            rank-``stage2_rank`` updates of the attention projections against the original's first output,
            merged into the weights; 0 = off. None (default): ``DEFAULT_STAGE2_STEPS`` where it applies (real
            calibration data, not the synthetic fallback; an FX program whose attention projections carry the
            Hugging Face BERT-family names), else off with a report line saying why
            (:func:`.stage2.stage2_plan`). With ``minutes``, stage 1 gets ``STAGE1_SHARE`` of the budget and
            stage 2 the rest. ``report["stage2"]`` summarises it.
        attention_ce: λ_ce, weight of the attention-map cross-entropy term of stage 1 (:mod:`.attention_ce`);
            0 (default) = output MSE only.
        measure_model: compute model-level fidelity (one more rewrite + runs on the held-out batches).
        report_path: also write the report as JSON here.
        shard: one rank of a distributed run (:mod:`.distributed`); only rank 0 writes ``out`` / ``report_path``
            and its report holds every site; the other ranks return (the loaded original, their partial report).
        max_memory: bytes of captured activations held in RAM; more spills to a temporary folder beside ``out``
            (:mod:`.capture_store`). None = everything in RAM.

    Returns:
        (fitted LoadedModel, report). ``report["sites"][name]`` has ``before`` (untrained swap) / ``after`` site
        fidelity on the held-out batches (cosine, rel_error, max_abs, mse), ``steps``, ``seconds``;
        ``report["model_fidelity"]`` has ``before`` / ``after`` model fidelity (per output, averaged over the
        held-out batches).

    Raises:
        OptionError (bad variant / option / selection), CalibrationDataError (bad data file), TransferError
        (bad checkpoint), NoSitesError (nothing to replace), ModelLoadError, OutputPathError.
    """
    t0 = time.time()
    out_path = mio.check_output_path(out) if out is not None else None
    if report_path is not None:
        mio.check_output_path(report_path, (".json",))
    _check_numbers(stage2_steps=stage2_steps, stage2_rank=stage2_rank, stage2_lr=stage2_lr)
    from .data import has_tokenizer, stage2_batches
    from .phases import PhaseClock
    from .stage2 import STAGE1_SHARE, lora_stage2, stage2_plan
    clock = PhaseClock()
    with clock("load"):
        model = mio.load_model(model, example_inputs)
    # decided (and refused, for an explicit request it cannot serve) before any work; the rewritten program has
    # the original's kind and weight names
    n_stage2, why_not = stage2_plan(model, stage2_steps, real_data=data is not None or has_tokenizer(model, tokenizer))
    minutes_stage1 = minutes * STAGE1_SHARE if minutes is not None and n_stage2 else minutes
    # distributed: stage 2 runs data-parallel on every rank (.stage2_dp), so every rank receives all fitted params
    dp = shard if n_stage2 and shard is not None and shard.world > 1 else None
    if dp is not None:
        dp.gather_to_all = True
    loaded, calib, fitted, report = fit_params(
        model, attention=attention, options=options, hybrid_window=hybrid_window, data=data, steps=steps,
        minutes=minutes_stage1, seed=seed, layers=layers, keep_softmax=keep_softmax, checkpoint=checkpoint,
        progress=progress, example_inputs=example_inputs, batch_size=batch_size, max_samples=max_samples,
        max_length=max_length, lr=lr, scalar_lr=scalar_lr, sites_per_capture=sites_per_capture, tokenizer=tokenizer,
        threads=threads, attention_ce=attention_ce, shard=shard, max_memory=max_memory,
        capture_dir=out_path.parent if out_path is not None else None)
    for phase, seconds in report.get("phases", {}).items():
        clock.add(phase, seconds)
    from passes.attention import get_variant
    variant = get_variant(attention)
    opts = transfer_options(variant, options, hybrid_window)

    def untrained_outputs() -> list[dict[str, np.ndarray]]:  # the untrained swap's held-out outputs (fit-free)
        untrained, _ = _rewrite(loaded, variant, opts, layers, keep_softmax, None)
        return _outputs(untrained, calib.held_out)

    if shard is not None and not shard.writes and dp is None:  # distributed: rank 0 rewrites, measures, writes
        if measure_model and shard.rank == shard.helper:  # ... while the helper rank runs the untrained swap
            shard.send_to_root(untrained_outputs())
        return loaded, report
    if out_path is not None and out_path.suffix == ".pt2" and loaded.kind == "onnx":
        from rewrite.errors import OutputPathError
        raise OutputPathError(f"{out_path}: an ONNX model can only be written as .onnx")
    with clock("rewrite"):
        new_model, _ = _rewrite(loaded, variant, opts, layers, keep_softmax, fitted)
    t_stage2 = time.perf_counter()
    if n_stage2:  # LoLCATs stage 2, merged into the weights (the graph stays plain)
        deadline_min = None if minutes is None else max(0.05, minutes - (time.time() - t0) / 60.0)
        # same threads as stage 1 (default 1): on a shared 2-core machine two threads measured no faster
        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            s2_train = stage2_batches(loaded, data, calib, tokenizer=tokenizer, max_samples=max_samples,
                                      max_length=max_length)  # default text: calib.train + further (long) samples
            report["stage2"] = lora_stage2(new_model, loaded, s2_train, rank=stage2_rank, steps=n_stage2,
                                           lr=stage2_lr, seed=seed, minutes=deadline_min, dp=dp)
            report["stage2"]["train_batches"] = len(s2_train)
        finally:
            torch.set_num_threads(previous_threads)
        if dp is not None:
            report["stage2"]["data_parallel_ranks"] = dp.world
        if dp is not None and not dp.writes:  # stage 2 done together; rank 0 measures and writes
            if measure_model and dp.rank == dp.helper:
                dp.send_to_root(untrained_outputs())
            return loaded, report
    elif why_not:
        report["stage2"] = {"steps": 0, "note": why_not}
        report["lines"].append(f"stage 2 off: {why_not}")
    clock.add("stage2", time.perf_counter() - t_stage2)
    # with ranks, rank 0 exports while the helper still rewrites and runs the untrained swap (longer than rank 0's
    # two held-out passes), into a hidden folder that moves to the output path only once the helper's outputs came:
    # a lost helper still leaves nothing written
    helped = measure_model and shard is not None and shard.helper != shard.rank
    early = helped and out_path is not None
    staged: Any = contextlib.nullcontext(None)
    if early:
        from rewrite.atomic import atomic_folder
        staged = atomic_folder(out_path)
    with staged as stage:
        if early:
            with clock("export"):
                _export_to(new_model, stage / out_path.name)
        if measure_model:
            with clock("model_fidelity"):
                # the original's held-out outputs once, for both comparisons; with ranks the helper sends the
                # untrained swap's outputs (it skips the original's run: rank 0 waits less for it)
                reference = _outputs(loaded, calib.held_out)
                after = _fidelity_of(reference, _outputs(new_model, calib.held_out))
                untrained = shard.receive_from_helper() if helped else untrained_outputs()
                report["model_fidelity"] = {"before": _fidelity_of(reference, untrained), "after": after}
    if out_path is not None:
        if not early:
            with clock("export"):
                _export_to(new_model, out_path)
        report["output"] = str(out_path)
    report["phases"] = clock.as_dict()
    report["seconds"] = round(time.time() - t0, 2)
    if report_path is not None:
        import json

        from rewrite.atomic import write_text
        write_text(report_path, json.dumps(report, indent=1, default=str))
    new_model.extra["transfer"] = {"params": fitted, "options": dict(opts), "variant": variant.name}
    return new_model, report


def site_params(report_or_model: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The fitted per-site params of a model returned by :func:`transfer` (for ``AttentionRewritePass(params=)``)."""
    extra = getattr(report_or_model, "extra", {}) or {}
    if "transfer" not in extra:
        raise TransferError("this model was not produced by passes.transfer.transfer")
    return extra["transfer"]["params"]


def _check_numbers(**values: Any) -> None:
    """Every numeric knob finite and in range, named as its CLI flag (``--batch-size``) in the error."""
    rules = {"steps": (0, False), "minutes": (0, True), "batch_size": (1, False), "max_samples": (1, False),
             "max_length": (1, False), "lr": (0, True), "scalar_lr": (0, True), "hybrid_window": (0, False),
             "attention_ce": (0, False), "stage2_steps": (0, False), "stage2_rank": (1, False),
             "stage2_lr": (0, True)}
    for name, value in values.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        low, exclusive = rules[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise OptionError(f"{flag} must be a finite number, got {value!r}")
        if value < low or (exclusive and value == low):
            raise OptionError(f"{flag} must be {'>' if exclusive else '>='} {low}, got {value!r}")


def _check_checkpoint_path(path: str | os.PathLike[str]) -> None:
    """Fail before any work when the checkpoint cannot be written: missing folder, or a folder given as file."""
    file = Path(path)
    if file.is_dir():
        raise TransferError(f"{file}: --checkpoint is a folder, not a checkpoint file")
    if not file.parent.is_dir():
        raise TransferError(f"{file}: --checkpoint folder {file.parent} does not exist")


def _read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's dict, read weights-only (tensors, numbers, strings, containers: a pickle that imports
    anything else is refused before it can run, DESIGN.md principle 7). Raises :class:`TransferError`."""
    from rewrite.errors import first_line
    from rewrite.safe_load import load_weights_only
    if Path(path).is_dir():
        raise TransferError(f"{path}: --checkpoint is a folder, not a checkpoint file")
    try:
        data = load_weights_only(path)
    except Exception as exc:  # UnpicklingError (refused global), RuntimeError (not a torch file), OSError
        raise TransferError(f"{path}: cannot read the transfer checkpoint ({first_line(exc)}); checkpoints are "
                            "loaded weights-only") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT \
            or not isinstance(data.get("meta"), dict) or not isinstance(data.get("sites"), dict):
        raise TransferError(f"{path}: not a softswap transfer checkpoint")
    return data


def load_checkpoint_params(path: str | os.PathLike[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-site params stored in a transfer checkpoint (e.g. to rewrite another conversion of the same model)."""
    data = _read_checkpoint(path)
    return {k: dict(v["params"]) for k, v in data["sites"].items()}
