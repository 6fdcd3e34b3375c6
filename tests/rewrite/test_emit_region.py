"""The region emitter: modules spliced into FX programs and ONNX graphs, replacing values and adding outputs,
checked against the same computation done directly in torch (and ONNX in onnxruntime)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rewrite import io as mio
from rewrite.capture import capture_values
from rewrite.emit_region import Region, open_for_regions, prepare_onnx, splice_onnx
from rewrite.errors import UnsupportedModelError
from rewrite.graph.onnx_graph import OnnxGraph
from rewrite.recognize import recognize
from rewrite.verify import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits_models import digits_split, export_fx, export_onnx, trained_digits_cnn  # noqa: E402


class NewHead(nn.Module):
    """Replaces the logits with another linear map of the feature and adds the feature's norm as an output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.linear = nn.Linear(64, 10)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(feature), feature.norm(dim=-1)


class Standardize(nn.Module):
    """Reads the value it replaces: logits → standardized logits, and adds the per-row max."""

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = logits.mean(-1, keepdim=True)
        return (logits - mu) / logits.std(-1, keepdim=True, correction=0), logits.amax(-1)


def _head_values(g, outs):
    head = recognize(g, outs).heads[0]
    node = next(n for n in g.nodes() if g.node_name(n) == head.node)
    return g.canon(node).inputs[0], outs[0]


def _loaded(kind, model, tmp_path):
    return export_fx(model) if kind == "fx" else mio.load_model(export_onnx(model, tmp_path / "m.onnx"))


@pytest.mark.parametrize("kind", ["fx", "onnx"])
@pytest.mark.parametrize("which", ["new_head", "standardize"])
def test_replace_and_add(tmp_path, kind, which):
    model = trained_digits_cnn()
    loaded = _loaded(kind, model, tmp_path)
    x = digits_split().x_test[:37]
    module = NewHead() if which == "new_head" else Standardize()
    add = "feature_norm" if which == "new_head" else "row_max"
    view = open_for_regions(loaded)  # FX: the unlifted module; ONNX: a clone at opset >= 18
    feature, logits = _head_values(view.graph, view.outputs)
    inputs = [feature] if which == "new_head" else [logits]
    region = Region("r0", inputs, [logits], [add])
    examples = None if kind == "fx" else \
        {"r0": [torch.from_numpy(v) for v in capture_values(loaded, view.graph, inputs, {"x": x[:3]})]}
    new = view.splice(loaded, [(region, module)], examples)
    assert new.output_names[-1] == add and len(new.output_names) == 2
    got = run(new, {"x": x})
    with torch.no_grad():
        feat = model.features(torch.from_numpy(x))
        expect = module(feat) if which == "new_head" else module(model(torch.from_numpy(x)))
    names = list(got)
    np.testing.assert_allclose(got[names[0]], expect[0].numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got[add], expect[1].numpy(), atol=2e-5, rtol=1e-5)
    if kind == "onnx":
        assert names[0] == loaded.output_names[0]  # the replaced output keeps its name
        head_node = recognize(OnnxGraph(loaded.onnx), list(loaded.onnx.graph.outputs)).heads[0].node
        assert head_node not in {n.name for n in new.onnx.graph} or which == "standardize"  # the old head is gone


@pytest.mark.parametrize("kind", ["fx", "onnx"])
def test_add_only_leaves_outputs_bit_identical(tmp_path, kind):
    model = trained_digits_cnn()
    loaded = _loaded(kind, model, tmp_path)
    x = digits_split().x_test[:20]
    view = open_for_regions(loaded)
    feature, _ = _head_values(view.graph, view.outputs)
    examples = None if kind == "fx" else \
        {"score": [torch.from_numpy(capture_values(loaded, view.graph, [feature], {"x": x[:2]})[0])]}
    new = view.splice(loaded, [(Region("score", [feature], (), ["score"]), _Norm())], examples)
    before, after = run(loaded, {"x": x}), run(new, {"x": x})
    first = list(before)[0]
    assert np.array_equal(before[first], after[first])
    with torch.no_grad():
        np.testing.assert_allclose(after["score"], model.features(torch.from_numpy(x)).norm(dim=-1).numpy(),
                                   rtol=1e-5)


class _SumOfNorms(nn.Module):
    """A module taking its inputs as ``*values`` (the exporter needs one dynamic-shape entry for the tuple)."""

    def forward(self, *values: torch.Tensor) -> torch.Tensor:
        return sum(v.flatten(1).norm(dim=-1) for v in values)


def test_varargs_module_exports_with_dynamic_batch(tmp_path):
    model = trained_digits_cnn()
    loaded = mio.load_model(export_onnx(model, tmp_path / "m.onnx"))
    onnx_model = prepare_onnx(loaded)
    g = OnnxGraph(onnx_model)
    feature, logits = _head_values(g, list(onnx_model.graph.outputs))
    x = digits_split().x_test[:9]
    ex = [torch.from_numpy(v) for v in capture_values(loaded, g, [feature, logits], {"x": x[:3]})]
    new = splice_onnx(loaded, onnx_model, [(Region("s", [feature, logits], (), ["s"]), _SumOfNorms())], {"s": ex})
    got = run(new, {"x": x})["s"]
    with torch.no_grad():
        t = torch.from_numpy(x)
        expect = model.features(t).norm(dim=-1) + model(t).norm(dim=-1)
    np.testing.assert_allclose(got, expect.numpy(), rtol=1e-5)


class _Norm(nn.Module):
    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f.norm(dim=-1)


def test_output_name_clash_is_refused(tmp_path):
    model = trained_digits_cnn()
    loaded = mio.load_model(export_onnx(model, tmp_path / "m.onnx"))
    onnx_model = prepare_onnx(loaded)
    g = OnnxGraph(onnx_model)
    feature, _ = _head_values(g, list(onnx_model.graph.outputs))
    with pytest.raises(UnsupportedModelError, match="already has an output named 'logits'"):
        splice_onnx(loaded, onnx_model, [(Region("r", [feature], (), ["logits"]), _Norm())], {"r": []})
