"""Bad input: a typed error naming the culprit, CLI exit code 2, no output written, the input unchanged."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import rewrite
from rewrite.cli import main
from rewrite.errors import ModelLoadError, NoSitesError, OutputPathError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _attention_onnx(path: Path) -> Path:
    class Block(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
    q = torch.randn(1, 2, 8, 16)
    torch.onnx.export(Block(), (q, q, q), str(path), dynamo=False, input_names=["q", "k", "v"], opset_version=17)
    return path


def _mlp_onnx(path: Path) -> Path:
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
                      (torch.randn(2, 8),), str(path), dynamo=False, input_names=["x"], opset_version=17)
    return path


def _cli(*args: str) -> int:
    return main([str(a) for a in args])


def test_truncated_onnx(tmp_path):
    good = _attention_onnx(tmp_path / "good.onnx")
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    before = _digest(bad)
    with pytest.raises(ModelLoadError, match="truncated.onnx"):
        rewrite.inspect(bad)
    assert _cli("convert", bad, "-o", tmp_path / "out.onnx", "--attention", "reference") == 2
    assert not (tmp_path / "out.onnx").exists()
    assert _digest(bad) == before


def test_not_an_onnx_file(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 20)
    assert _cli("inspect", bad) == 2
    err = capsys.readouterr().err
    assert "notes.onnx" in err and "Traceback" not in err


def test_unknown_custom_op_is_reported(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    report = rewrite.inspect(path).to_dict()
    assert report["unknown_ops"] == {"com.example::FancyOp": 1}
    assert report["attention_sites"] == []
    assert _cli("inspect", path) == 0
    assert "com.example::FancyOp" in capsys.readouterr().out


def test_no_attention(tmp_path, capsys):
    path = _mlp_onnx(tmp_path / "mlp.onnx")
    assert _cli("inspect", path) == 0
    assert "no attention" in capsys.readouterr().out
    with pytest.raises(NoSitesError, match="no attention site"):
        rewrite.convert(path, tmp_path / "out.onnx", attention="linear")
    assert _cli("convert", path, "-o", tmp_path / "out.onnx", "--attention", "linear") == 2
    assert "nothing was rewritten" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_escaping_the_folder(tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32).tobytes(), raw=True)
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    entry = w.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = inner / "escape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        rewrite.inspect(path)
    assert _cli("inspect", path) == 2


def test_pt2_that_is_not_an_exported_program(tmp_path):
    bad = tmp_path / "weights.pt2"
    torch.save({"w": torch.ones(3)}, bad)
    with pytest.raises(ModelLoadError, match="weights.pt2"):
        rewrite.inspect(bad)
    assert _cli("inspect", bad) == 2


def test_output_in_missing_folder(tmp_path):
    path = _attention_onnx(tmp_path / "attn.onnx")
    before = _digest(path)
    target = tmp_path / "missing" / "out.onnx"
    with pytest.raises(OutputPathError, match="does not exist"):
        rewrite.convert(path, target, attention="reference")
    assert _cli("convert", path, "-o", target, "--attention", "reference") == 2
    assert not target.parent.exists()
    assert _digest(path) == before


def test_unknown_variant_and_option(tmp_path, capsys):
    path = _attention_onnx(tmp_path / "attn.onnx")
    assert _cli("convert", path, "-o", tmp_path / "o.onnx", "--attention", "nonsense") == 2
    assert "nonsense" in capsys.readouterr().err
    assert _cli("convert", path, "-o", tmp_path / "o.onnx", "--attention", "linear", "--option", "bogus=1") == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_cli_subprocess_exit_code(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    proc = subprocess.run([sys.executable, "-m", "rewrite.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "x.onnx" in proc.stderr and "Traceback" not in proc.stderr
