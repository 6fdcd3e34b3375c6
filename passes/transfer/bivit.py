"""Quantization-aware training of a BiViT-binarised model, distilled from the float model (``softswap transfer
--binarize bivit``).

Flow of :func:`qat`:

1. load the model (FX only) and its data: an ``.npz`` in the :mod:`rewrite.fit_data` format (arrays keyed by input
   name, ``y`` optional — labels are only used to report accuracy, and for the cross-entropy term when
   ``label_weight`` > 0), or, without data, seeded synthetic inputs (:func:`passes.transfer.data.synthetic_batches`:
   Gaussian noise for image inputs — enough to exercise the pipeline, not to recover accuracy on real images);
   held-out split (stratified by label);
2. the teacher's logits (the float program's first output) on every sample, computed once;
3. the student: the float program with trainable BiViT modules (:func:`passes.binarize.bivit.binarize_program`);
   staged schedule (cross-layer binarisation): the attention part is binarised from step 0, the MLP part joins
   after ``attention_fraction`` of the steps (or of the time budget), its α re-initialised from its weight at the
   switch; with one part selected there is one stage;
4. Adam on every parameter of the student (latent weights and α at ``binary_lr``, norms, embeddings, classifier,
   biases at ``lr``) with the loss
   T² · KL(softmax(teacher/T) ‖ softmax(student/T)) (+ ``label_weight`` · cross-entropy);
   minibatches drawn from a generator seeded by (seed, step), so a resumed run sees the batches a straight run sees;
5. checkpoint (``torch.save``: student state, optimizer state, step) every ``save_every`` steps and at the end,
   resumed when the file exists (same options and seed required);
6. freeze (deploy form), re-export, report accuracy / agreement with the teacher / logit fidelity on the held-out
   part right after binarisation and after training, and the packed size.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from rewrite import emit_fx, io as mio, metrics
from rewrite.errors import OptionError, SoftswapError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "softswap-bivit-qat/1"
DEFAULT_STEPS = 300


class QATError(SoftswapError):
    """Quantization-aware training cannot proceed (names the checkpoint or data at fault)."""


def _first_tensor(out: Any) -> torch.Tensor:
    for leaf in torch.utils._pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise QATError("the model returns no tensor")


def _has_labels(data: Any) -> bool:
    from rewrite.fit_data import FitData
    if isinstance(data, FitData):
        return True
    if isinstance(data, Mapping):
        return "y" in data
    path = Path(data)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                return "y" in archive.files
        except Exception:  # unreadable: load_fit_data reports it
            return False
    return False


def load_data(loaded: mio.LoadedModel, data: Any, held_out: float, seed: int, synthetic_samples: int = 256
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None, np.ndarray | None, str]:
    """(train inputs, held-out inputs, train labels or None, held-out labels or None, source description)."""
    from rewrite.api import input_shapes
    from rewrite.fit_data import FitData, load_fit_data
    if data is None:
        from .data import synthetic_batches
        batches = synthetic_batches(loaded, max(2, synthetic_samples // 32), 32, None, seed)
        arrays = {k: np.concatenate([b[k] for b in batches]) for k in loaded.input_names}
        fd = FitData(arrays, np.zeros(len(next(iter(arrays.values()))), np.int64), source="synthetic")
        labelled = False
    else:
        fd = load_fit_data(data, loaded.input_names, input_shapes(loaded), need_labels=False)
        labelled = _has_labels(data)
    train, held = fd.split(held_out, seed)
    return (train.inputs, held.inputs, train.y if labelled else None, held.y if labelled else None,
            f"{fd.source} ({len(fd)} samples{', labelled' if labelled else ', no labels'})")


def _call(module: Any, loaded: mio.LoadedModel, inputs: Mapping[str, np.ndarray], index: Any) -> torch.Tensor:
    leaves = [torch.as_tensor(np.ascontiguousarray(inputs[n][index])) for n in loaded.input_names]
    args, kwargs = torch.utils._pytree.tree_unflatten(leaves, loaded.ep.call_spec.in_spec)
    return _first_tensor(module(*args, **kwargs))


def _logits(module: Any, loaded: mio.LoadedModel, inputs: Mapping[str, np.ndarray], batch: int = 256
            ) -> torch.Tensor:
    n = len(next(iter(inputs.values())))
    with torch.no_grad():
        return torch.cat([_call(module, loaded, inputs, slice(i, i + batch)).float() for i in range(0, n, batch)])


def evaluate(logits: torch.Tensor, teacher: torch.Tensor, labels: np.ndarray | None) -> dict[str, float]:
    """Held-out numbers: accuracy (with labels), top-1 agreement with the teacher, logit cosine / relative error."""
    fid = metrics.fidelity(teacher, logits)
    out = {"agreement": float((logits.argmax(-1) == teacher.argmax(-1)).float().mean()),
           "cosine": round(fid["cosine"], 5), "rel_error": round(fid["rel_error"], 5)}
    if labels is not None:
        out["accuracy"] = float((logits.argmax(-1).numpy() == labels).mean())
    return out


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), batch mean."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                    reduction="batchmean") * t * t


def _check(steps: Any, minutes: Any, lr: float, temperature: float, attention_fraction: float, batch_size: int,
           label_weight: float) -> None:
    for name, value, low, strict in (("steps", steps, 0, False), ("minutes", minutes, 0, True), ("lr", lr, 0, True),
                                     ("temperature", temperature, 0, True), ("batch-size", batch_size, 1, False),
                                     ("label-weight", label_weight, 0, False)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) \
                or value < low or (strict and value == low):
            raise OptionError(f"--{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    if not 0.0 <= attention_fraction <= 1.0:
        raise OptionError(f"attention_fraction must lie in [0, 1], got {attention_fraction!r}")


def _read_checkpoint(path: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    from rewrite.errors import first_line
    from rewrite.safe_load import load_weights_only
    if path.is_dir():
        raise QATError(f"{path}: --checkpoint is a folder, not a checkpoint file")
    try:
        data = load_weights_only(path)
    except Exception as exc:
        raise QATError(f"{path}: cannot read the QAT checkpoint ({first_line(exc)}); checkpoints are loaded "
                       "weights-only") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise QATError(f"{path}: not a softswap BiViT QAT checkpoint")
    for key, value in meta.items():
        if data["meta"].get(key) != value:
            raise QATError(f"{path}: checkpoint was made with {key}={data['meta'].get(key)!r}, this run has "
                           f"{key}={value!r}; use another --checkpoint")
    return data


def _save_checkpoint(path: Path | None, meta: Mapping[str, Any], step: int, student: Any, optimizer: Any,
                     losses: list[float], mlp_on: bool) -> None:
    if path is None:
        return
    from rewrite.atomic import atomic_output
    with atomic_output(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "meta": dict(meta), "step": step, "mlp_on": mlp_on,
                    "state": {k: v.detach().clone() for k, v in student.state_dict().items()},
                    "optim": optimizer.state_dict(), "losses": losses[-200:]}, tmp)


def qat(model: Any, out: str | os.PathLike[str] | None = None, *, options: Mapping[str, Any] | None = None,
        data: Any = None, steps: int | None = None, minutes: float | None = None, seed: int = 0,
        checkpoint: str | os.PathLike[str] | None = None, progress: bool = True, batch_size: int = 64,
        lr: float = 1e-3, binary_lr: float | None = None, temperature: float = 2.0, label_weight: float = 0.0,
        attention_fraction: float = 0.5,
        held_out: float = 0.2, save_every: int = 100, example_inputs: Any = None, threads: int | None = 1,
        report_path: str | os.PathLike[str] | None = None) -> tuple[mio.LoadedModel, dict[str, Any]]:
    """Binarise ``model`` with BiViT (``options``: stage, parts, ratio as for ``binarize.bivit``) and train it with
    distillation from the float model; return (deploy-form LoadedModel, report) and write ``out`` when given.

    ``steps`` (default :data:`DEFAULT_STEPS` when neither is given) or ``minutes`` bound the training; ``seed``
    fixes initial batches and order (equal seeds give equal results); ``checkpoint`` is resumed when it exists.
    ``lr``: Adam learning rate of the float parameters (norms, embeddings, classifier, biases); ``binary_lr``
    (default ``lr / 10``): of the latent binary weights and their scales α, which are ~0.05 in size, so a step of
    ``lr`` would flip signs and rescale α by several percent per step.
    ``report["before"]`` / ``report["after"]`` hold held-out accuracy (with labels), agreement with the teacher and
    logit fidelity right after binarisation and after training; ``report["teacher"]`` the float model's accuracy.
    Raises OptionError, FitDataError, QATError, UnsupportedModelError (ONNX input), OutputPathError.
    """
    from passes.binarize.bivit import binarize_program, report_lines, resolve_options
    from passes.binarize.fx_rewrite import freeze, set_enabled

    from .transfer import _progress

    t0 = time.time()
    _check(steps, minutes, lr, temperature, attention_fraction, batch_size, label_weight)
    if binary_lr is None:
        binary_lr = lr / 10
    if isinstance(binary_lr, bool) or not isinstance(binary_lr, (int, float)) or not np.isfinite(binary_lr) \
            or binary_lr <= 0:
        raise OptionError(f"--binary-lr must be a finite number > 0, got {binary_lr!r}")
    out_path = mio.check_output_path(out) if out is not None else None
    if report_path is not None:
        mio.check_output_path(report_path, (".json",))
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and (ckpt_path.is_dir() or not ckpt_path.parent.is_dir()):
        raise QATError(f"{ckpt_path}: --checkpoint must be a file in an existing folder")
    opts = resolve_options(options)
    if steps is None and minutes is None:
        steps = DEFAULT_STEPS
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        loaded = mio.load_model(model, example_inputs)
        from passes.binarize.bivit import require_fx
        require_fx(loaded)
        x_train, x_held, y_train, y_held, source = load_data(loaded, data, held_out, seed)
        teacher_module = loaded.ep.module()
        t_train = _logits(teacher_module, loaded, x_train)
        t_held = _logits(teacher_module, loaded, x_held)

        # right after binarisation (every selected part on, no training)
        plain, _, _, _ = binarize_program(loaded, opts, measure=False, own_params=True)
        before = evaluate(_logits(plain, loaded, x_held), t_held, y_held)
        del plain

        staged = len(opts["parts"]) == 2
        first = ("attention",) if staged else opts["parts"]
        student, installed, plans, pass_report = binarize_program(loaded, opts, enabled_parts=first, own_params=True)
        if not installed:
            from rewrite.errors import NoSitesError
            reasons = "; ".join(f"{r['name']}: {r['reason']}" for r in pass_report["sites"])
            raise NoSitesError(f"{loaded.source}: nothing to binarize ({reasons or 'no attention site'})")
        binary = {id(p) for _, role, m in installed.values() if role != "core" for p in (m.weight, m.alpha)}
        rest = [p for p in student.parameters() if p.requires_grad and id(p) not in binary]
        optimizer = torch.optim.Adam([{"params": [p for p in student.parameters() if id(p) in binary],
                                       "lr": binary_lr},
                                      {"params": rest, "lr": lr}])
        meta = {"options": {**opts, "parts": "+".join(opts["parts"])}, "seed": seed, "steps": steps,
                "attention_fraction": attention_fraction}
        step, losses, mlp_on = 0, [], not staged
        if ckpt_path is not None and ckpt_path.exists():
            state = _read_checkpoint(ckpt_path, meta)
            step, losses, mlp_on = int(state["step"]), list(state["losses"]), bool(state["mlp_on"])
            if mlp_on and staged:
                for _, role, module in installed.values():
                    module.enabled = True  # α comes from the checkpoint: no re-initialisation
            student.load_state_dict(state["state"])
            optimizer.load_state_dict(state["optim"])
            log.info("resuming BiViT QAT from %s at step %d", ckpt_path, step)
        n = len(next(iter(x_train.values())))
        deadline = t0 + 60.0 * minutes if minutes is not None else None
        started = time.time()
        with _progress(progress) as bar:
            task = bar.add_task("bivit qat", total=steps, completed=step, loss="-")
            while (steps is None or step < steps) and (deadline is None or time.time() < deadline):
                fraction = step / steps if steps else (time.time() - t0) / (60.0 * minutes)
                if staged and not mlp_on and fraction >= attention_fraction:
                    set_enabled(installed, "mlp", True)
                    mlp_on = True
                    log.info("BiViT QAT: MLP binarised from step %d", step)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
                index = torch.randint(0, n, (min(batch_size, n),), generator=gen).numpy()
                logits = _call(student, loaded, x_train, index)
                loss = distillation_loss(logits, t_train[index], temperature)
                if label_weight and y_train is not None:
                    loss = loss + label_weight * F.cross_entropy(logits, torch.as_tensor(y_train[index]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                value = float(loss.detach())
                losses.append(value)
                bar.update(task, completed=step, loss=f"{value:.4g}")
                if save_every and step % save_every == 0:
                    _save_checkpoint(ckpt_path, meta, step, student, optimizer, losses, mlp_on)
        _save_checkpoint(ckpt_path, meta, step, student, optimizer, losses, mlp_on)
        if staged and not mlp_on:
            set_enabled(installed, "mlp", True)  # a budget that ended in stage one still deploys every part
            mlp_on = True
        freeze(student, installed)
        after = evaluate(_logits(student, loaded, x_held), t_held, y_held)
        ep = emit_fx.reexport(loaded, student)
        new = mio.LoadedModel(kind="fx", source=loaded.source, ep=ep, example_inputs=loaded.example_inputs,
                              input_names=loaded.input_names, output_names=loaded.output_names,
                              extra=dict(loaded.extra))
    finally:
        torch.set_num_threads(previous_threads)
    teacher = {"accuracy": float((t_held.argmax(-1).numpy() == y_held).mean())} if y_held is not None else {}
    report: dict[str, Any] = {
        "model": loaded.source, "graph": loaded.kind, "pass": "binarize.bivit", "options": meta["options"],
        "seed": seed, "steps": step, "minutes": minutes, "train_seconds": round(time.time() - started, 2),
        "data": source, "temperature": temperature, "label_weight": label_weight, "lr": lr,
        "binary_lr": binary_lr,
        "schedule": ({"attention_from": 0, "mlp_from_fraction": attention_fraction} if staged
                     else {opts["parts"][0] + "_from": 0}),
        "teacher": teacher, "before": before, "after": after, "losses": [round(v, 5) for v in losses[-20:]],
        "sites": pass_report["sites"], "size": pass_report["size"],
        "checkpoint": str(ckpt_path) if ckpt_path else None,
    }
    report["lines"] = report_lines(pass_report, note=None) + [qat_line(report)]
    if out_path is not None:
        from rewrite.api import export
        export(new, out_path)
        report["output"] = str(out_path)
    report["seconds"] = round(time.time() - t0, 2)
    if report_path is not None:
        import json

        from rewrite.atomic import write_text
        write_text(report_path, json.dumps(report, indent=1, default=str))
    return new, report


def qat_line(report: Mapping[str, Any]) -> str:
    """One line: held-out accuracy (or agreement) of the float model, right after binarisation, after QAT."""
    b, a = report["before"], report["after"]
    if "accuracy" in a:
        return (f"held-out accuracy: float {report['teacher']['accuracy']:.3f}, binarised before QAT "
                f"{b['accuracy']:.3f} (before training: low expected), after {report['steps']} QAT steps {a['accuracy']:.3f}")
    return (f"held-out top-1 agreement with the float model: before QAT {b['agreement']:.3f}, after "
            f"{report['steps']} QAT steps {a['agreement']:.3f} (no labels in the data)")
