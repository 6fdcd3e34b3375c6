"""Feature taps (rewrite/recognize/taps.py): the default taps of a CNN (stage outputs, penultimate), a residual CNN
with strided convs, and a small transformer classifier (block inputs, penultimate), in FX and ONNX; ``--layers``
selection and its errors; ``inspect`` lists the taps."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewrite import io as mio
from rewrite.api import graph_view, inspect
from rewrite.cli import main
from rewrite.errors import OptionError
from rewrite.recognize import recognize, select_taps, spellings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits_models import export_fx, export_onnx, trained_digits_cnn  # noqa: E402


class ResCNN(nn.Module):
    """stem (stride 2) → block at 8×8 → downsampling block (strided conv + 1×1 shortcut) at 4×4 → mean → head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.short = nn.Conv2d(8, 16, 1, stride=2)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.c1(h))
        h = F.relu(self.short(h) + self.c3(F.relu(self.c2(h))))
        return self.head(h.mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self, e: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(e)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))
        self.heads = heads
        self.mlp = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, 2 * e), nn.GELU(), nn.Linear(2 * e, e))

    def forward(self, x):
        b, t, e = x.shape
        h = self.norm(x)
        split = lambda z: z.view(b, t, self.heads, e // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        p = torch.softmax(q @ k.transpose(-2, -1) / (e // self.heads) ** 0.5, dim=-1)
        x = x + self.o((p @ v).transpose(1, 2).reshape(b, t, e))
        return x + self.mlp(x)


class TinyViT(nn.Module):
    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


def _fx(module, example):
    return mio.export_module(module, {"x": example}, dynamic_shapes={"x": {0: torch.export.Dim("batch", max=512)}})


def _taps(loaded):
    g, outs = graph_view(loaded)
    return recognize(g, outs).taps, g


@pytest.mark.parametrize("kind", ["fx", "onnx"])
def test_digits_cnn_taps_are_the_stage_outputs_and_the_penultimate(tmp_path, kind):
    model = trained_digits_cnn()
    loaded = export_fx(model) if kind == "fx" else mio.load_model(export_onnx(model, tmp_path / "m.onnx"))
    taps, _ = _taps(loaded)
    assert [(t.role, t.pool, t.features) for t in taps] == [
        ("stage", "spatial_mean", 32), ("stage", "spatial_mean", 64), ("penultimate", "none", 64)]
    assert [t.shape[1:] for t in taps] == [(32, 8, 8), (64, 4, 4), (64,)]
    assert [t.name for t in taps] == ["tap0", "tap1", "tap2"]


def test_residual_cnn_takes_the_first_value_per_resolution():
    model = ResCNN().eval()
    taps, g = _taps(_fx(model, torch.randn(2, 3, 16, 16)))
    assert [(t.role, t.shape[1:]) for t in taps] == [("stage", (8, 8, 8)), ("stage", (16, 4, 4)),
                                                     ("penultimate", (16,))]
    # the 8×8 tap is the block output that feeds both the strided conv and the shortcut (not the stem's output)
    users = {g.op_name(u) for u in g.users(taps[0].value)}
    assert users == {"aten.conv2d.default"} and len(g.users(taps[0].value)) == 2


@pytest.mark.parametrize("kind", ["fx", "onnx"])
def test_transformer_taps_are_block_inputs_and_the_penultimate(tmp_path, kind):
    model = TinyViT().eval()
    loaded = _fx(model, torch.randn(2, 5, 4))
    if kind == "onnx":
        from rewrite.api import export
        loaded = mio.load_model(export(loaded, tmp_path / "vit.onnx"))
    g, outs = graph_view(loaded)
    rec = recognize(g, outs)
    assert len(rec.attention_sites) == 3
    taps = rec.taps
    assert [(t.role, t.pool) for t in taps] == [("block", "token_mean")] * 3 + [("penultimate", "none")]
    assert all(t.features == 16 for t in taps)
    # each block tap is what the block's Q projection reads (the normalized residual stream)
    from rewrite.recognize.taps import _projection_input
    assert [g.key(_projection_input(g, s.q)) for s in rec.attention_sites] == [g.key(t.value) for t in taps[:3]]


def test_select_taps_by_index_span_tap_name_and_node_name():
    loaded = export_fx(trained_digits_cnn())
    taps, g = _taps(loaded)
    assert [t.name for t in select_taps(taps, "2,0")] == ["tap0", "tap2"]
    assert [t.name for t in select_taps(taps, "1-2")] == ["tap1", "tap2"]
    assert [t.name for t in select_taps(taps, ["tap1", taps[0].node])] == ["tap0", "tap1"]
    chosen = select_taps(taps, "relu,tap2", g)  # the stem's ReLU is not a default tap; a node name picks it
    assert [(t.node, t.role, t.pool, t.features) for t in chosen] == [("relu", "chosen", "spatial_mean", 16),
                                                                    ("relu_3", "penultimate", "none", 64)]
    assert select_taps(taps, None) == taps


@pytest.mark.parametrize("spec,match", [("3", "out of range: the model has 3 feature taps"),
                                        ("0,,1", "empty item"), ("nonsense", "neither a tap index"),
                                        ("2-1", "reversed")])
def test_bad_layer_selections_are_option_errors(spec, match):
    taps, g = _taps(export_fx(trained_digits_cnn()))
    with pytest.raises(OptionError, match=match):
        select_taps(taps, spec, g)


def test_inspect_lists_the_taps_and_their_spellings(tmp_path, capsys):
    path = export_onnx(trained_digits_cnn(), tmp_path / "m.onnx")
    report = inspect(path).to_dict()
    assert [t["role"] for t in report["feature_taps"]] == ["stage", "stage", "penultimate"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "feature taps" in out and "tap2=node_relu_3 penultimate" in out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["feature_taps"][0]["pool"] == "spatial_mean"
    tables = spellings()
    assert [row["tag"] for row in tables["feature taps (OOD detectors)"]] == ["stage", "block", "penultimate"]


@pytest.mark.parametrize("kind,pool", [("fx", "mean"), ("onnx", "cls")])
def test_the_pass_on_a_transformer_scores_far_sequences_higher(tmp_path, kind, pool):
    """ood.mahalanobis end to end on TinyViT: block taps token-pooled in the graph (ReduceMean / Gather in ONNX),
    logits bit-identical, far-away sequences score higher than held-out in-distribution ones."""
    from passes.ood.mahalanobis_pass import MahalanobisPass
    from rewrite.fit_data import load_fit_data
    from rewrite.verify import run
    torch.manual_seed(0)
    model = TinyViT().eval()
    loaded = _fx(model, torch.randn(2, 5, 4))
    if kind == "onnx":
        from rewrite.api import export
        loaded = mio.load_model(export(loaded, tmp_path / "vit.onnx"))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 1, 4)) * 2
    y = np.arange(300) % 3
    x = (centres[y] + 0.5 * rng.normal(size=(300, 5, 4))).astype(np.float32)
    result = MahalanobisPass(fit=load_fit_data({"x": x[:240], "y": y[:240]}, ["x"]),
                             options={"token_pool": pool}).run(loaded)
    used = [s for s in result.report["sites"] if s["status"] == "replaced"]
    assert [s["pool"] for s in used] == ["token_mean" if pool == "mean" else "cls"] * 3 + ["none"]
    far = (8 + 3 * rng.normal(size=(60, 5, 4))).astype(np.float32)
    probe = np.concatenate([x[240:], far])
    before, after = run(loaded, {"x": probe}), run(result.model, {"x": probe})
    first = loaded.output_names[0] if kind == "fx" else list(before)[0]
    assert np.array_equal(before[first], after[first])
    assert after["ood_score"][60:].min() > after["ood_score"][:60].max()
