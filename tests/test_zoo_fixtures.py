"""The zoo fixtures themselves work: exports run and match eager; .pt2 and HF loading behave."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import zoo as Z
from rewrite.hf import (
    HFLoadError,
    Pt2LoadError,
    is_hf_folder,
    load_hf_folder,
    load_pt2,
    minilm_path,
    pt2_pytree_types,
)

ATOL = 1e-4
ALT_SHAPE = (3, 12)  # batch, seq: differs from every example shape


def _close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} outputs, eager has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.as_tensor(g)
        assert g.shape == w.shape, f"{what}[{i}]: shape {tuple(g.shape)} != {tuple(w.shape)}"
        err = (g.float() - w.float()).abs().max().item() if w.numel() else 0.0
        assert err <= ATOL, f"{what}[{i}]: max abs err {err:.2e} > {ATOL}"


# --------------------------------------------------------------------------- #
# Zoo metadata
# --------------------------------------------------------------------------- #
def test_zoo_metadata(zoo: list[Z.ZooModel]) -> None:
    names = [m.name for m in zoo]
    assert len(names) == len(set(names))
    for m in zoo:
        assert set(m.unsupported) <= set(Z.EXPORTERS) and set(m.static) <= set(Z.EXPORTERS)
        if m.negative:
            assert m.expected == [] and m.expected_reason
        for s in m.expected:
            assert s.mask in Z.MASK_KINDS
            assert s.heads % s.kv_heads == 0 and s.head_dim > 0 and s.scale > 0
            assert s.causal == ("causal" in s.mask)
    assert {m.name for m in zoo if m.classifier_heads} >= {"hf_bert_cls", "hf_vit_cls", "mlp_classifier", "cnn_classifier"}
    llama = Z.get("hf_llama_sdpa").expected[0]
    assert llama.kv_heads < llama.heads
    minilm = Z.get("minilm").expected
    assert len(minilm) == 6 and minilm[0].heads == 12 and minilm[0].head_dim == 32
    assert math.isclose(minilm[0].scale, 32**-0.5) and minilm[0].mask == "key_padding"
    assert math.isclose(Z.get("sdpa_scale03").expected[0].scale, 0.3)


@pytest.mark.parametrize("name", Z.params())
def test_build_runs_and_is_deterministic(name: str) -> None:
    m = Z.get(name)
    module, args, dyn = m.build()
    assert not module.training
    out = m.eager()
    assert out and all(torch.isfinite(t).all() for t in out)
    assert len(out) == len(m.built().output_names)
    assert m.build()[0] is module  # memoized: exports and eager share weights


# --------------------------------------------------------------------------- #
# torch.export
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", Z.params())
def test_fx_matches_eager(name: str, zoo_fx) -> None:
    m = Z.get(name)
    if "fx" in m.unsupported:
        pytest.skip(m.unsupported["fx"])
    ep = zoo_fx(name)
    gm = ep.module()
    with torch.no_grad():
        _close(Z.flat_outputs(gm(*m.build()[1])), m.eager(), f"{name} fx")
        alt = m.inputs(*ALT_SHAPE)
        if alt is not None:  # dynamic shapes really are dynamic
            _close(Z.flat_outputs(gm(*alt)), m.eager(alt), f"{name} fx @ {ALT_SHAPE}")


@pytest.mark.parametrize("name", Z.params())
def test_pt2_roundtrip(name: str, zoo_fx, tmp_path: Path) -> None:
    m = Z.get(name)
    if "fx" in m.unsupported:
        pytest.skip(m.unsupported["fx"])
    path = tmp_path / f"{name}.pt2"
    torch.export.save(zoo_fx(name), path)
    ep = load_pt2(path)
    with torch.no_grad():
        _close(Z.flat_outputs(ep.module()(*m.build()[1])), m.eager(), f"{name} pt2")


# --------------------------------------------------------------------------- #
# ONNX
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("name", "exporter"), [p for p in Z.params(exporters=True) if p.values[1] != "fx"])
def test_onnx_matches_eager(name: str, exporter: str, zoo_onnx) -> None:
    import onnx

    m = Z.get(name)
    path = zoo_onnx(name, exporter)
    model = onnx.load(str(path), load_external_data=False)
    want_opset = 18 if exporter == "dynamo" else 17
    assert any(o.domain in ("", "ai.onnx") and o.version == want_opset for o in model.opset_import)
    b = m.built()
    assert [o.name for o in model.graph.output] == b.output_names
    _close(Z.ort_run(path, b.args, b.input_names), m.eager(), f"{name} {exporter}")
    alt = m.inputs(*ALT_SHAPE)
    if alt is not None and exporter not in m.static:
        _close(Z.ort_run(path, alt, b.input_names), m.eager(alt), f"{name} {exporter} @ {ALT_SHAPE}")


def test_unsupported_exporter_raises() -> None:
    m = Z.ZooModel("tmp_unsupported", Z.build_mlp_classifier, [], unsupported={"legacy": "because"})
    with pytest.raises(Z.ExportUnsupported, match="because"):
        Z.export_onnx(m, "legacy")
    with pytest.raises(ValueError):
        Z.export_onnx(m, "tflite")


# --------------------------------------------------------------------------- #
# .pt2 loading
# --------------------------------------------------------------------------- #
def _tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, attn_implementation="sdpa")  # fmt: skip
    return BertModel(cfg).eval()


def test_pt2_with_model_output(tmp_path: Path) -> None:
    """A wrapper-free HF export returns a ModelOutput; load_pt2 must register it in a fresh process."""
    model = _tiny_bert()
    ids = torch.randint(1, 50, (2, 8))
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, 5:] = 0
    ep = torch.export.export(model, (), {"input_ids": ids, "attention_mask": am})
    assert "BaseModelOutputWithPooling" in str(ep.call_spec.out_spec)
    path = tmp_path / "bert_model_output.pt2"
    torch.export.save(ep, path)
    assert any("transformers." in t for t in pt2_pytree_types(path))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am).last_hidden_state
    torch.save({"ids": ids, "am": am, "want": want}, tmp_path / "io.pt")

    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        assert "transformers" not in sys.modules
        try:
            torch.export.load({str(path)!r})
            plain = "ok"
        except Exception as exc:
            plain = type(exc).__name__
        from rewrite.hf import load_pt2
        ep = load_pt2({str(path)!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = ep.module()(input_ids=io["ids"], attention_mask=io["am"])
        print(type(out).__name__, plain, float((out.last_hidden_state - io["want"]).abs().max()))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cls_name, plain, err = res.stdout.split()[-3:]
    assert cls_name == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert plain != "ok"  # plain torch.export.load cannot do this in a fresh process
    assert float(err) <= ATOL


def test_bad_pt2_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt2"
    text.write_text("not a program")
    with pytest.raises(Pt2LoadError, match="notes.pt2"):
        load_pt2(text)
    with pytest.raises(Pt2LoadError, match="missing.pt2"):
        load_pt2(tmp_path / "missing.pt2")
    other_zip = tmp_path / "other.pt2"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(Pt2LoadError, match="other.pt2"):
        load_pt2(other_zip)
    torch.save({"w": torch.ones(2)}, tmp_path / "state.pt2")  # a zip, but a state dict
    with pytest.raises(Pt2LoadError, match="state.pt2"):
        load_pt2(tmp_path / "state.pt2")
    assert issubclass(Pt2LoadError, ValueError)


# --------------------------------------------------------------------------- #
# Hugging Face folders
# --------------------------------------------------------------------------- #
def test_hf_folder_errors(tmp_path: Path) -> None:
    assert not is_hf_folder(tmp_path)
    with pytest.raises(HFLoadError, match="config.json"):
        load_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert is_hf_folder(tmp_path)
    with pytest.raises(HFLoadError, match="weights") as info:
        load_hf_folder(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "config.json").write_text("{broken")
    assert not is_hf_folder(tmp_path)
    with pytest.raises(HFLoadError):
        load_hf_folder(tmp_path / "nope")


def test_hf_folder_roundtrip_tiny(tmp_path: Path) -> None:
    """save_pretrained -> load_hf_folder (eager and sdpa) gives the same outputs as the original."""
    model = _tiny_bert()
    model.save_pretrained(tmp_path)
    assert is_hf_folder(tmp_path)
    for impl in ("sdpa", "eager"):
        hf = load_hf_folder(tmp_path, attn_implementation=impl, batch=3, seq=10)
        assert hf.attn_implementation == impl and hf.tokenizer_path is None
        assert hf.input_names == ["input_ids", "attention_mask", "token_type_ids"]
        assert hf.output_names == ["last_hidden_state", "pooler_output"]
        am = hf.example_inputs["attention_mask"]
        assert am.shape == (3, 10) and bool(am[0].all()) and not bool(am[1:].all())
        with torch.no_grad():
            got = hf.module(*hf.args)
            want = model(**hf.example_inputs)
        assert isinstance(got, tuple)
        _close(list(got), [want.last_hidden_state, want.pooler_output], f"tiny bert {impl}")


@pytest.mark.slow
def test_minilm_matches_direct_transformers() -> None:
    from transformers import AutoModel

    folder = minilm_path()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    hf = load_hf_folder(folder)
    assert hf.tokenizer_path == folder and hf.config.num_attention_heads == 12
    direct = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    with torch.no_grad():
        got = hf.module(*hf.args)
        want = direct(**hf.example_inputs)
    _close(list(got), [want.last_hidden_state, want.pooler_output], "minilm")
    # real tokenizer gives ids the model accepts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf.tokenizer_path, local_files_only=True)
    enc = tok(["a short one", "a somewhat longer second sentence here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.module(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        ref = direct(**enc)
    _close(list(out), [ref.last_hidden_state, ref.pooler_output], "minilm tokenized")
