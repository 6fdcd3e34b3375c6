"""LoLCATs stage 2 (passes/transfer/stage2.py) on a tiny random BERT: end-to-end low-rank fine-tuning of the
attention projections, merged into plain weights.

Independent references: numpy's matrix rank of the weight change (≤ rank), the training loss recomputed by
running the merged program against the original, and onnxruntime on the merged program's ONNX export.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path as _Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from passes.transfer import transfer  # noqa: E402
from passes.transfer.stage2 import lora_stage2  # noqa: E402
from passes.transfer.transfer import TransferError  # noqa: E402
sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
from transfer_models import tiny_bert  # noqa: E402
from rewrite.io import LoadedModel, fx_to_onnx, load_model  # noqa: E402
from rewrite.verify import run as run_model  # noqa: E402


def _tiny_bert() -> LoadedModel:
    return tiny_bert()


def _mse(a: LoadedModel, b: LoadedModel, batches: list[dict[str, np.ndarray]]) -> float:
    out = []
    for batch in batches:
        x = run_model(a, batch)["last_hidden_state"]
        y = run_model(b, batch)["last_hidden_state"]
        m = batch["attention_mask"][..., None].astype(np.float64)
        out.append(float((((x - y) ** 2) * m).sum() / (m.sum() * x.shape[-1])))
    return float(np.mean(out))


@pytest.fixture(scope="module")
def setup() -> tuple[LoadedModel, LoadedModel, dict, list]:
    original = _tiny_bert()
    fitted, report = transfer(original, attention="linear", steps=0, batch_size=4, progress=False,
                              measure_model=False)
    feeds = [{k: v.numpy() for k, v in original.extra["hf"].make_inputs(4, 12, seed=s).items()} for s in range(8)]
    return original, fitted, report, feeds


def test_stage2_improves_merges_low_rank_and_exports(setup, tmp_path) -> None:
    original, fitted, _, feeds = setup
    train, held = feeds[:6], feeds[6:]
    before_w = {k: v.detach().clone() for k, v in fitted.ep.state_dict.items()}
    before_train = _mse(original, fitted, train)
    rep = lora_stage2(fitted, original, train, rank=2, steps=60, lr=2e-3, seed=0)
    assert len(rep["weights"]) == 8  # q, k, v, o of 2 layers
    after_train = _mse(original, fitted, train)
    assert after_train < 0.9 * before_train, (before_train, after_train)
    # merged weights: only the targeted ones changed, each by a matrix of rank <= 2
    for name, w in fitted.ep.state_dict.items():
        delta = (w - before_w[name]).detach().double().numpy()
        if name in rep["weights"]:
            assert 0 < np.linalg.matrix_rank(delta, tol=1e-6) <= 2, name
        else:
            assert not delta.any(), name
    # the graph stays plain: FX program and its ONNX export (onnxruntime) agree
    onnx_model = load_model(fx_to_onnx(fitted))
    assert onnx_model.kind == "onnx"
    for batch in held:
        a = run_model(fitted, batch)["last_hidden_state"]
        b = run_model(onnx_model, batch)["last_hidden_state"]
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_stage2_deterministic_and_typed_errors(setup) -> None:
    original, _, _, feeds = setup
    results = []
    for _ in range(2):
        fitted, _ = transfer(original, attention="linear", steps=5, batch_size=4, progress=False,
                             measure_model=False)
        lora_stage2(fitted, original, feeds[:4], rank=2, steps=5, seed=1)
        results.append({k: v.clone() for k, v in fitted.ep.state_dict.items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    with pytest.raises(TransferError, match="no 2-D weight"):
        lora_stage2(original, original, feeds[:2], targets=("no-such-layer",), steps=1)
    with pytest.raises(TransferError, match="FX program"):
        lora_stage2(load_model(fx_to_onnx(original)), original, feeds[:2], steps=1)


def test_transfer_api_runs_stage2(setup) -> None:
    original, _, _, _ = setup
    plain, _ = transfer(original, attention="linear", steps=0, batch_size=4, progress=False, measure_model=False)
    staged, report = transfer(original, attention="linear", steps=0, batch_size=4, progress=False,
                              stage2_steps=3, stage2_rank=2)
    assert report["stage2"]["steps"] == 3 and report["stage2"]["rank"] == 2
    changed = [n for n in report["stage2"]["weights"]
               if not torch.equal(plain.ep.state_dict[n], staged.ep.state_dict[n])]
    assert changed == report["stage2"]["weights"]


def test_freeze_restores_flags_when_training_fails(setup) -> None:
    """An error inside stage 2 (here: a batch without the program's inputs) leaves every parameter's
    requires_grad as it was (the freeze of the program's weights is undone in a finally)."""
    from passes.transfer.stage2 import _frozen
    original, fitted, _, feeds = setup
    gm = fitted.ep.module()
    gm.get_parameter(next(n for n, _ in gm.named_parameters())).requires_grad_(False)  # a mixed set of flags
    before = [p.requires_grad for p in gm.parameters()]
    assert any(before) and not all(before)
    with pytest.raises(RuntimeError, match="boom"):
        with _frozen(gm):
            assert not any(p.requires_grad for p in gm.parameters())
            raise RuntimeError("boom")
    assert [p.requires_grad for p in gm.parameters()] == before


def test_stage2_reports_timing_per_part(setup) -> None:
    original, fitted, _, feeds = setup
    from passes.transfer.transfer import rewrite_with_params
    model = rewrite_with_params(original, {}, attention="linear")
    report = lora_stage2(model, original, feeds[:2], steps=3, seed=1)
    timing = report["timing"]
    assert set(timing) == {"teacher", "agree", "forward", "backward", "reduce", "optimizer"}
    assert all(v >= 0 for v in timing.values()) and report["steps"] == 3
    assert sum(timing.values()) <= report["seconds"] + 0.02  # parts of stage 2's own wall time (rounded to 10 ms)


def test_runner_builds_once_and_matches_a_direct_module_call(setup, monkeypatch) -> None:
    """rewrite.verify.runner and stage 2's teacher: one module (``ep.module()``) for many batches (counted), outputs
    equal to calling the program's module directly."""
    from passes.transfer.stage2 import _teacher
    from rewrite.verify import runner
    original, _, _, feeds = setup
    module = original.ep.module()  # the reference, built before counting
    builds = []
    build = original.ep.module

    def counting(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(original.ep, "module", counting)
    call = runner(original)
    wants = []
    for batch in feeds[:3]:
        args, kwargs = torch.utils._pytree.tree_unflatten(
            [torch.from_numpy(batch[n]) for n in original.input_names], original.ep.call_spec.in_spec)
        with torch.no_grad():
            want = module(*args, **kwargs)
        wants.append(want[0].numpy())
        np.testing.assert_array_equal(call(batch)["last_hidden_state"], wants[-1])
    assert len(builds) == 1  # three batches, one build
    refs = _teacher(original, [feeds[0], None, feeds[1], feeds[2]])
    assert len(builds) == 2 and refs[1] is None  # the teacher: four entries, one build
    for ref, want in zip([refs[0], refs[2], refs[3]], wants):
        np.testing.assert_array_equal(ref.numpy(), want)


def test_merged_weight_is_the_three_op_formula_bit_for_bit() -> None:
    """stage2._merged (one addmm for power-of-two scales) equals w + s * (b @ a) exactly, values and gradients, so
    the default recipe's losses and merged weights are unchanged by the fused form."""
    from passes.transfer.stage2 import _merged
    gen = torch.Generator().manual_seed(7)
    for scale in (2.0, 0.5, 4.0, 0.75):
        w = torch.randn(48, 40, generator=gen)
        a0, b0 = torch.randn(8, 40, generator=gen) / 6, torch.randn(48, 8, generator=gen) / 3
        g = torch.randn(48, 40, generator=gen)
        a1, b1 = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        a2, b2 = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        fused, plain = _merged(w, a1, b1, scale), w + scale * (b2 @ a2)
        assert torch.equal(fused, plain), scale
        (fused * g).sum().backward()
        (plain * g).sum().backward()
        assert torch.equal(a1.grad, a2.grad) and torch.equal(b1.grad, b2.grad), scale
