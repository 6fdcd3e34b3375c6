"""Run two models on the same inputs and report per-output fidelity (max abs / rel error, cosine, top-1).

FX programs run in torch eager (``ep.module()``), ONNX graphs in onnxruntime with graph optimizations off. Inputs
are matched by name, so a model folder can be compared with its rewritten ``.onnx``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .metrics import fidelity
from .errors import VerificationError
from .io import LoadedModel, synth_inputs

log = logging.getLogger(__name__)


@dataclass
class OutputFidelity:
    """Fidelity of one output. ``rel_error`` = ‖b − a‖ / ‖a‖; ``top1`` = argmax agreement over the last axis."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    rel_error: float
    cosine: float
    top1: float | None


@dataclass
class VerifyReport:
    outputs: list[OutputFidelity] = field(default_factory=list)
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # outputs only the rewritten model has (e.g. ood_score)
    changed: list[str] = field(default_factory=list)  # outputs a pass changes on purpose: not compared

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": [asdict(o) for o in self.outputs], "inputs": {k: list(v) for k, v in self.inputs.items()},
                "min_cosine": self.min_cosine, "max_abs": self.max_abs, "added_outputs": list(self.added),
                "changed_outputs": list(self.changed)}


def _to_numpy(t: torch.Tensor) -> Any:
    """numpy for every dtype numpy has; bfloat16 tensors stay torch tensors (FX runs take them as they are)."""
    return t if t.dtype == torch.bfloat16 else t.detach().cpu().numpy()


def default_inputs(model: LoadedModel, seed: int = 0) -> dict[str, np.ndarray]:
    """The model's own example inputs, or synthetic ones from an ONNX graph's input types."""
    if model.example_inputs:
        return {k: (_to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v))
                for k, v in model.example_inputs.items()}
    if model.kind == "onnx":
        return synth_inputs(model, seed=seed)
    raise VerificationError(f"{model.source}: no example inputs; pass inputs explicitly")


def run(model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on named ``inputs``, keyed by output name."""
    return runner(model)(inputs)


def runner(model: LoadedModel) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """:func:`run` for many input sets: the FX program's module (or the ONNX session) is built once, here.

    Building an FX module (``ep.module()``) costs ~0.1 s for MiniLM, as much as a forward pass of a small batch.
    The module is a snapshot: weights changed in ``model.ep`` afterwards are not seen — make a new runner."""
    if model.kind == "fx":
        module = model.ep.module()

        def call(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            _check_inputs(model, inputs)
            leaves = [inputs[n] if isinstance(inputs[n], torch.Tensor) else torch.from_numpy(np.array(inputs[n]))
                      for n in model.input_names]
            args, kwargs = torch.utils._pytree.tree_unflatten(leaves, model.ep.call_spec.in_spec)
            try:
                with torch.no_grad():
                    out = module(*args, **kwargs)
            except Exception as exc:  # shape / dtype errors of the program on these inputs
                from .errors import first_line
                from .interrupts import reraise_if_interrupted
                reraise_if_interrupted(exc)
                raise VerificationError(f"{model.source}: running the program failed ({first_line(exc)})") from exc
            flat = [t for t in torch.utils._pytree.tree_leaves(out)]
            return {name: t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
                    for name, t in zip(model.output_names, flat)}
        return call
    from .io import ort_run, ort_session
    session = ort_session(model.onnx, source=model.source)
    names = [o.name for o in session.get_outputs()]

    def call_onnx(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        _check_inputs(model, inputs)
        feeds = {i.name: (inputs[i.name].float().numpy() if isinstance(inputs[i.name], torch.Tensor)
                          else np.asarray(inputs[i.name])) for i in session.get_inputs()}
        return dict(zip(names, ort_run(session, feeds, model.onnx, model.source)))
    return call_onnx


def _check_inputs(model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> None:
    missing = [n for n in model.input_names if n not in inputs]
    if missing:
        raise VerificationError(f"{model.source}: inputs {missing} not provided (have {sorted(inputs)})")


def added_outputs(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> list[str]:
    """Outputs a pass added: the candidate's names beyond the reference's, when it keeps every reference name."""
    return [n for n in candidate if n not in reference] if set(reference) < set(candidate) else []


def compare(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> list[OutputFidelity]:
    """Per-output fidelity; outputs are matched by name, else by position. Outputs the candidate adds beyond every
    reference name (:func:`added_outputs`) have no reference and are not compared."""
    pairs = []
    if set(reference) <= set(candidate):
        pairs = [(n, reference[n], candidate[n]) for n in reference]
    else:
        if len(reference) != len(candidate):
            raise VerificationError(f"output mismatch: {list(reference)} vs {list(candidate)}")
        pairs = [(n, reference[n], c) for n, c in zip(reference, candidate.values())]
    out = []
    for name, a, b in pairs:
        a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a64.shape != b64.shape:
            raise VerificationError(f"output {name!r}: shape {a64.shape} vs {b64.shape}")
        fid = fidelity(a64, b64)
        top1 = None
        if a64.ndim >= 1 and a64.shape[-1] >= 2:
            top1 = float(np.mean(np.argmax(a64, -1) == np.argmax(b64, -1)))
        out.append(OutputFidelity(name=name, shape=tuple(a64.shape), max_abs=fid["max_abs"], max_rel=fid["max_rel"],
                                  rel_error=fid["rel_error"], cosine=fid["cosine"], top1=top1))
    return out


def verify(original: LoadedModel, rewritten: LoadedModel, inputs: Mapping[str, np.ndarray] | None = None,
           seed: int = 0, changed: Sequence[str] = ()) -> VerifyReport:
    """Run both models on the same inputs (the original's examples by default) and compare outputs. Outputs named
    in ``changed`` (changed on purpose by a pass, e.g. the boxes Soft-NMS keeps) are listed, not compared."""
    feeds = dict(inputs) if inputs is not None else default_inputs(original, seed)
    ref = run(original, feeds)
    cand = run(rewritten, feeds)
    skip = [n for n in changed if n in ref and n in cand]
    ref_cmp = {k: v for k, v in ref.items() if k not in skip}
    cand_cmp = {k: v for k, v in cand.items() if k not in skip}
    return VerifyReport(outputs=compare(ref_cmp, cand_cmp), inputs={k: tuple(v.shape) for k, v in feeds.items()},
                        added=added_outputs(ref, cand), changed=skip)
