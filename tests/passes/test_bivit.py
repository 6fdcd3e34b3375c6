"""The binarize.bivit pass on tiny Hugging Face ViTs: what is binarised and what stays float, options, refusals with
reasons, the size report."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from passes.binarize.size import packed_bytes
from rewrite import api, io as mio
from rewrite.cli import main as cli_main
from rewrite.errors import OptionError, UnsupportedModelError
from tests.vit_digits import export_vit, untrained_vit

aten = torch.ops.aten


@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    return untrained_vit()


def _targets(ep, target):
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target is target]


# ----------------------------------------------------------------------------------------------- the pass
def test_pass_binarises_attention_and_mlp_linears_only(tiny_vit):
    loaded = export_vit(tiny_vit)
    new, report = api.convert(loaded, binarize="bivit", verify=False)
    rows = report["passes"][0]["sites"]
    assert [r["name"] for r in rows] == ["attn0", "attn1"]
    for r in rows:
        assert r["status"] == "replaced" and r["reason"] == ""
        assert set(r["linears"]) == {"q", "k", "v", "o", "fc1", "fc2"}
        assert r["core"] is True
    ep = new.ep
    # what stays float: patch embedding (conv), the 5 layer norms, the classifier (the only aten.linear left)
    assert len(_targets(ep, aten.conv2d.default)) == 1
    assert len(_targets(ep, aten.layer_norm.default)) == 5
    linears = _targets(ep, aten.linear.default)
    float_left = [n for n in linears if "signs" not in str(n.args[1])]
    assert len(float_left) == 1
    sd = {**ep.state_dict, **ep.constants}
    classifier = [k for k in sd if k.endswith("classifier.weight")]
    assert len(classifier) == 1 and torch.equal(sd[classifier[0]], tiny_vit.classifier.weight)
    signs = {k: v for k, v in sd.items() if k.endswith(".signs")}
    assert len(signs) == 12
    for name, value in signs.items():
        assert set(value.unique().tolist()) == {-1.0, 1.0}, name
    # the attention softmax is now SAB: a comparison against the row max, no SDPA left
    assert not _targets(ep, aten.scaled_dot_product_attention.default)
    assert len(_targets(ep, aten.amax.default)) == 2


def test_parts_and_stage_options(tiny_vit):
    loaded = export_vit(tiny_vit)
    new, report = api.convert(loaded, binarize="bivit", options={"parts": "attention", "stage": "1w32a"},
                              verify=False)
    rows = report["passes"][0]["sites"]
    for r in rows:
        assert set(r["linears"]) == {"q", "k", "v", "o"}
        assert r["parts"]["mlp"] == "not selected (parts option)"
        assert r["core"] is False and "1w32a" in r["reason"]
    linears = _targets(new.ep, aten.linear.default)
    assert sum("signs" not in str(n.args[1]) for n in linears) == 1 + 2 * 2  # classifier + fc1/fc2 per layer
    assert not _targets(new.ep, aten.where.self) and not any("where" in str(n.target) for n in new.ep.graph.nodes)
    assert len(_targets(new.ep, aten.scaled_dot_product_attention.default)) == 2  # float attention core kept


@pytest.mark.parametrize("options", [{"stage": "w2a2"}, {"ratio": "0"}, {"ratio": "1.5"}, {"ratio": "x"},
                                     {"parts": "conv"}, {"parts": ""}, {"colour": "red"}])
def test_bad_options_are_refused(options):
    from rewrite.passes import get_pass
    with pytest.raises(OptionError, match="binarize.bivit"):
        get_pass("binarize.bivit", options=options)


@pytest.mark.parametrize("stage", ["w1a1", "1w32a"])
def test_onnx_input_through_the_same_sites_equals_the_fx_path(tiny_vit, tmp_path, stage):
    """An ONNX model is binarised by the same rule read on the ONNX graph; its output equals that of the FX
    program binarised and exported (onnxruntime, digits test images)."""
    import onnxruntime as ort

    from tests.digits_models import digits_split
    loaded = export_vit(tiny_vit)
    onnx_path = api.export(loaded, tmp_path / "vit.onnx")
    via_onnx, rep_onnx = api.convert(onnx_path, tmp_path / "a.onnx", binarize="bivit", options={"stage": stage})
    via_fx, rep_fx = api.convert(loaded, tmp_path / "b.onnx", binarize="bivit", options={"stage": stage},
                                 verify=False)
    rows_onnx, rows_fx = rep_onnx["passes"][0]["sites"], rep_fx["passes"][0]["sites"]
    assert [(r["name"], r["status"], sorted(r["linears"]), r["core"]) for r in rows_onnx] == \
        [(r["name"], r["status"], sorted(r["linears"]), r["core"]) for r in rows_fx]
    assert rep_onnx["passes"][0]["size"]["binary_linears"] == rep_fx["passes"][0]["size"]["binary_linears"]
    x = digits_split().x_test
    a = ort.InferenceSession(str(tmp_path / "a.onnx")).run(None, {"pixel_values": x})[0]
    b = ort.InferenceSession(str(tmp_path / "b.onnx")).run(None, {"pixel_values": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_qat_refuses_onnx_with_one_line(tiny_vit, tmp_path):
    from passes.transfer.bivit import qat
    onnx_path = api.export(export_vit(tiny_vit), tmp_path / "vit.onnx")
    with pytest.raises(UnsupportedModelError, match="not ONNX"):
        qat(onnx_path, steps=1, progress=False)
    assert cli_main(["transfer", str(onnx_path), "-o", str(tmp_path / "o.onnx"), "--binarize", "bivit",
                     "--steps", "1", "--no-progress"]) == 2
    assert not (tmp_path / "o.onnx").exists()


class PackedQKVBlock(nn.Module):
    """Attention with one packed qkv Linear (q, k, v are slices of it) and a gated MLP: both refused."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.gate, self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class SeparateQKVGatedBlock(PackedQKVBlock):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__(d, heads)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (m(h).view(b, t, self.h, d // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def test_packed_qkv_and_gated_mlp_are_refused_with_reasons():
    x = torch.randn(2, 5, 16)
    packed = mio.export_module(PackedQKVBlock().eval(), (x,))
    with pytest.raises(Exception, match="nothing was rewritten.*q projection"):
        api.convert(packed, binarize="bivit", verify=False)
    gated = mio.export_module(SeparateQKVGatedBlock().eval(), (x,))
    _, report = api.convert(gated, binarize="bivit", verify=False)
    row = report["passes"][0]["sites"][0]
    assert row["status"] == "replaced" and set(row["linears"]) == {"q", "k", "v", "o"}
    assert row["parts"]["mlp"].startswith("not matched") and "MLP fc1" in row["parts"]["mlp"]


def test_size_report_counts_packed_bits_and_scales(tiny_vit):
    _, report = api.convert(export_vit(tiny_vit), binarize="bivit", verify=False)
    size = report["passes"][0]["size"]
    shapes = [tuple(m.weight.shape) for name, m in tiny_vit.named_modules()
              if isinstance(m, nn.Linear) and "classifier" not in name]
    assert len(shapes) == 12
    weights = sum(o * i for o, i in shapes)
    assert size["binary_linears"]["packed_bytes"] == sum(-(-o * i // 8) for o, i in shapes) == packed_bytes(1, weights)
    assert size["binary_linears"]["scale_bytes"] == 4 * sum(o for o, _ in shapes)
    total = sum(p.numel() for p in tiny_vit.state_dict().values()) * 4
    assert size["float_bytes"] == total
    assert size["binarized_bytes"] == total - 4 * weights + size["binary_linears"]["packed_bytes"] \
        + size["binary_linears"]["scale_bytes"]
    assert size["ratio"] > 4


def test_deit_folder_through_the_same_sites(tmp_path):
    """A Hugging Face DeiT folder (CLS + distillation tokens, two heads): same rule, both heads stay float."""
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher
    cfg = DeiTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, num_labels=10)
    torch.manual_seed(0)
    DeiTForImageClassificationWithTeacher(cfg).eval().save_pretrained(tmp_path / "deit")
    new, report = api.convert(tmp_path / "deit", binarize="bivit", options={"stage": "1w32a"})
    rows = report["passes"][0]["sites"]
    assert len(rows) == 2 and all(set(r["linears"]) == {"q", "k", "v", "o", "fc1", "fc2"} for r in rows)
    linears = _targets(new.ep, aten.linear.default)
    assert sum("signs" not in str(n.args[1]) for n in linears) == 2  # the class head and the distillation head
    assert {o["name"] for o in report["fidelity"]["outputs"]} >= {"logits"}


def test_pt2_program_through_the_cli(tiny_vit, tmp_path, capsys):
    src = api.export(export_vit(tiny_vit), tmp_path / "vit.pt2")
    out = tmp_path / "bin.pt2"
    assert cli_main(["convert", str(src), "-o", str(out), "--binarize", "bivit", "--option", "stage=w1a1"]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "packed" in text and "not a result" in text
    reloaded = mio.load_model(out)
    sd = {**reloaded.ep.state_dict, **reloaded.ep.constants}
    assert sum(k.endswith(".signs") for k in sd) == 12


def test_one_option_item_may_carry_several_options():
    from passes.binarize.bivit import resolve_options
    got = resolve_options({"stage": "1w32a,parts=attention,mlp,ratio=0.3"})
    assert got == {"stage": "1w32a", "parts": ("attention", "mlp"), "ratio": 0.3}
    assert resolve_options({"parts": "mlp"})["parts"] == ("mlp",)
    with pytest.raises(OptionError, match="given twice"):
        resolve_options({"stage": "w1a1,stage=1w32a"})
