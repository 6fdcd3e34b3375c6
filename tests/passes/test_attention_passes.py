"""The attention passes over real graphs: FX and ONNX results of the same rewrite agree, the ONNX result
runs in onnxruntime, the .pt2 reloads and runs, unsupported masks are skipped with a reason, fp16/bf16 work."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rewrite
import zoo
from rewrite.binding import supports
from rewrite.errors import NoSitesError
from rewrite.io import from_exported_program, load_model, load_onnx
from rewrite.verify import run

from passes.attention import VARIANTS

MODELS = ["sdpa_causal", "sdpa_bool", "timm_vit_block", "mha_causal_float", "hf_bert_sdpa", "hf_gpt2_eager",
          "hf_llama_sdpa", "hf_vit_eager"]
PAIRS = [(m, v) for m in MODELS for v in ("linear", "mala", "sigmoid", "softplus", "soft")]


def _fx(name, zoo_fx):
    zm = zoo.get(name)
    _, args, _ = zm.build()
    ep = zoo_fx(name)
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    return from_exported_program(ep, source=name, example_inputs=dict(zip(names, args)))


def _onnx(name, zoo_onnx):
    zm = zoo.get(name)
    _, args, _ = zm.build()
    loaded = load_onnx(zoo_onnx(name, "dynamo"))
    loaded.example_inputs = {n: a.numpy() for n, a in zip(loaded.input_names, args)}
    loaded.extra["feeds"] = loaded.example_inputs
    return loaded


@pytest.mark.parametrize("name,variant", PAIRS, ids=[f"{m}-{v}" for m, v in PAIRS])
def test_fx_and_onnx_rewrites_agree(name, variant, zoo_fx, zoo_onnx, tmp_path):
    zm = zoo.get(name)
    expected_ok = all(supports(VARIANTS[variant].mask_kinds, s.mask) for s in zm.expected)
    fx, ox = _fx(name, zoo_fx), _onnx(name, zoo_onnx)
    if not expected_ok:
        with pytest.raises(NoSitesError, match="mask kind"):
            rewrite.convert(fx, attention=variant)
        return
    fx_new, fx_report = rewrite.convert(fx, tmp_path / "m.pt2", attention=variant)
    onnx_new, onnx_report = rewrite.convert(ox, tmp_path / "m.onnx", attention=variant)
    assert fx_report["passes"][0]["replaced"] == onnx_report["passes"][0]["replaced"] == len(zm.expected)
    feeds = {n: np.asarray(v) for n, v in ox.example_inputs.items()}
    fx_out = list(run(fx_new, feeds).values())
    onnx_out = list(run(load_onnx(tmp_path / "m.onnx"), feeds).values())  # the file, in onnxruntime
    for a, b in zip(fx_out, onnx_out):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
    reloaded = load_model(tmp_path / "m.pt2")  # .pt2 reloads and runs
    for a, b in zip(fx_out, run(reloaded, feeds).values()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for site in fx_report["passes"][0]["sites"]:  # the report carries per-site fidelity and options
        assert site["variant"] == variant and 0 <= site["fidelity"]["rel_error"] and "cosine" in site["fidelity"]


class TwoBlocks(torch.nn.Module):
    """One causal and one bidirectional SDPA block."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(y, k, v)


def test_unsupported_site_is_skipped_and_the_rest_converted(tmp_path):
    x = torch.randn(2, 16, 32)
    model, report = rewrite.convert(TwoBlocks(), tmp_path / "out.onnx", attention="soft", example_inputs=(x,),
                                    options={"num_landmarks": 4})
    sites = report["passes"][0]["sites"]
    assert [s["status"] for s in sites] == ["skipped", "replaced"]
    assert "causal" in sites[0]["reason"] and "soft" in sites[0]["reason"]
    assert report["fidelity"]["outputs"][0]["cosine"] > 0  # the converted model runs
    assert (tmp_path / "out.onnx").exists()


def test_layers_and_keep_softmax_select_sites(tmp_path):
    x = torch.randn(2, 16, 32)
    _, report = rewrite.convert(TwoBlocks(), attention="linear", example_inputs=(x,), keep_softmax="0")
    assert [s["status"] for s in report["passes"][0]["sites"]] == ["skipped", "replaced"]
    _, report = rewrite.convert(TwoBlocks(), attention="linear", example_inputs=(x,), layers="0")
    assert [s["status"] for s in report["passes"][0]["sites"]] == ["replaced", "skipped"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["linear", "sigmoid"])
def test_half_precision_models(dtype, variant):
    torch.manual_seed(0)
    block = TwoBlocks().eval()
    x = torch.randn(2, 16, 32)
    ref_model, _ = rewrite.convert(copy.deepcopy(block), attention=variant, example_inputs=(x,))
    half_model, report = rewrite.convert(copy.deepcopy(block).to(dtype), attention=variant,
                                         example_inputs=(x.to(dtype),))
    assert report["passes"][0]["replaced"] == 2
    with torch.no_grad():
        ref = ref_model.ep.module()(x)
        out = half_model.ep.module()(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 2e-2 * max(1.0, float(ref.abs().max()))


def test_per_site_parameters_reach_both_graph_kinds(tmp_path):
    """Different fitted parameters per site land in the FX program and in the ONNX graph alike."""
    from rewrite.attention_pass import AttentionRewritePass
    from rewrite.io import export_module, fx_to_onnx, LoadedModel

    x = torch.randn(2, 16, 32)
    fx = export_module(TwoBlocks().eval(), (x,))
    variant = VARIANTS["sigmoid"]
    params = {f"attn{i}": {"bias": torch.full((4,), -1.0 - i), "log_temp": torch.full((4,), 0.3 * i)}
              for i in range(2)}
    fx_new = AttentionRewritePass(variant, params=params).run(fx).model
    ox = LoadedModel(kind="onnx", source="two", onnx=fx_to_onnx(fx), input_names=["x"], output_names=["out"],
                     extra={"feeds": {"x": x.numpy()}})
    onnx_new = AttentionRewritePass(variant, params=params).run(ox).model
    plain = AttentionRewritePass(variant).run(ox).model
    feeds = {"x": x.numpy()}
    a, b, c = (list(run(m, feeds).values())[0] for m in (fx_new, onnx_new, plain))
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
    assert np.abs(a - c).max() > 1e-3  # the parameters matter
