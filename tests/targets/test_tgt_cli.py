"""`softswap compile` / `run`: a library and its metadata are written, run on an .npz, and match onnxruntime;
bad input exits with 2 and writes nothing."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

from rewrite.cli import main
from tgt_models import ort_run, softmax_matmul_model


def test_compile_run_roundtrip(tmp_path, rng):
    model = softmax_matmul_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    lib = tmp_path / "m.so"
    assert main(["compile", str(path), "--target", "avx2", "-o", str(lib)]) == 0
    assert lib.exists() and (tmp_path / "m.so.json").exists()
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    np.savez(tmp_path / "x.npz", **feeds)
    assert main(["run", str(lib), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")]) == 0
    with np.load(tmp_path / "y.npz") as got:
        (name,) = got.files
        np.testing.assert_allclose(got[name], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["compile", str(tmp_path / "missing.onnx"), "--target", "avx2", "-o", str(tmp_path / "m.so")]) == 2
    assert "missing.onnx" in capsys.readouterr().err
    assert not (tmp_path / "m.so").exists()
    path = tmp_path / "m.onnx"
    onnx.save(softmax_matmul_model(), path)
    assert main(["compile", str(path), "--target", "nosuchcpu", "-o", str(tmp_path / "m.so")]) == 2
    assert "nosuchcpu" in capsys.readouterr().err
    assert not (tmp_path / "m.so").exists()


def _tiny_bert_folder(path):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def test_hugging_face_folder_compiles_with_its_names_and_shapes(tmp_path, rng):
    """A Hugging Face folder (exported with keyword inputs) compiles with and without --shape; the artefact takes the
    model's input names, returns its output names, and matches the torch model."""
    import torch

    folder = tmp_path / "bert"
    model = _tiny_bert_folder(folder)
    lib = tmp_path / "bert.so"
    shape = ["--shape", "input_ids=3,12", "--shape", "attention_mask=3,12", "--shape", "token_type_ids=3,12"]
    assert main(["compile", str(folder), "--target", "host", "-o", str(lib), *shape]) == 0
    meta = __import__("json").loads((tmp_path / "bert.so.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o["name"] for o in meta["outputs"]] == ["last_hidden_state", "pooler_output"]
    ids = rng.integers(0, 100, (3, 12)).astype(np.int64)
    mask = np.ones((3, 12), np.int64)
    mask[1, 8:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    np.savez(tmp_path / "x.npz", **feeds)
    assert main(["run", str(lib), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")]) == 0
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    with np.load(tmp_path / "y.npz") as got:
        np.testing.assert_allclose(got["last_hidden_state"], ref.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got["pooler_output"], ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
    # without --shape: the program's own example shapes
    assert main(["compile", str(folder), "--target", "host", "-o", str(tmp_path / "b.so")]) == 0


def test_shape_for_an_unknown_input_is_one_line(tmp_path, capsys):
    folder = tmp_path / "bert"
    _tiny_bert_folder(folder)
    capsys.readouterr()  # what saving the folder printed (transformers' progress bar) is not softswap's
    assert main(["compile", str(folder), "--target", "host", "-o", str(tmp_path / "m.so"),
                 "--shape", "bogus=2,8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0] and "input_ids" in err[0]
    assert not (tmp_path / "m.so").exists()


@pytest.mark.parametrize("opset", [14, 17])
def test_classic_exporter_bert_compiles_and_matches_onnxruntime(tmp_path, rng, opset):
    """The ONNX most hubs hold: torch's classic exporter (dynamo=False), dynamic batch and length.  Its attention-mask
    broadcast shape is computed (Shape -> ConstantOfShape -> Where -> Expand); with --shape it folds and imports."""
    import torch

    folder = tmp_path / "bert"
    bert = _tiny_bert_folder(folder)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.from_numpy(rng.integers(0, 100, (2, 8)).astype(np.int64))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    path = tmp_path / "legacy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped().eval(), args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=["last_hidden_state", "pooler_output"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    lib = tmp_path / "legacy.so"
    shape = [a for n in names for a in ("--shape", f"{n}=3,10")]
    assert main(["compile", str(path), "--target", "host", "-o", str(lib), *shape]) == 0
    feeds = {"input_ids": rng.integers(0, 100, (3, 10)).astype(np.int64), "attention_mask": np.ones((3, 10), np.int64),
             "token_type_ids": np.zeros((3, 10), np.int64)}
    feeds["attention_mask"][0, 6:] = 0
    np.savez(tmp_path / "x.npz", **feeds)
    assert main(["run", str(lib), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")]) == 0
    ref = ort_run(onnx.load(path), feeds)
    with np.load(tmp_path / "y.npz") as got:
        np.testing.assert_allclose(got["last_hidden_state"], ref[0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got["pooler_output"], ref[1], atol=1e-4, rtol=1e-4)
