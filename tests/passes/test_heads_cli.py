"""``softswap convert MODEL -o OUT --head svm|zloss|fourier --fit DATA``: the held-out accuracy lines, and bad data
or a model with no head as one error line naming the problem, exit status 2, nothing written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from rewrite.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits_models import digits_split, export_onnx, trained_digits_cnn  # noqa: E402


class Net(nn.Module):
    """``forward(x)`` over a layer stack (the input is named ``x``)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads_cli")
    model_path = export_onnx(trained_digits_cnn(softmax=True), root / "digits.onnx")
    split = digits_split()
    good = root / "good.npz"
    np.savez(good, x=split.x_train, y=split.y_train)
    from rewrite.api import export
    from rewrite.io import export_module
    x4 = torch.rand(8, 1, 8, 8)
    no_head = export(export_module(Net(nn.Conv2d(1, 2, 3), nn.ReLU()).eval(), {"x": x4},
                                   dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=4096)}}),
                     root / "nohead.onnx")
    torch.manual_seed(0)
    binary = export(export_module(Net(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2)).eval(),
                                  {"x": x4}, dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=4096)}}),
                    root / "binary.onnx")
    return root, model_path, split, good, no_head, binary


def _run(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_fits_an_svm_head_and_prints_the_held_out_accuracy(files, tmp_path, capsys):
    _, model_path, split, good, _, _ = files
    out, report = tmp_path / "svm.onnx", tmp_path / "r.json"
    status, stdout, _ = _run(["convert", str(model_path), "-o", str(out), "--head", "svm", "--fit", str(good),
                              "--option", "progress=false", "--report", str(report)], capsys)
    assert status == 0
    assert "held-out accuracy" in stdout and "(svm head)" in stdout
    row = json.loads(report.read_text())["passes"][0]["sites"][0]
    assert row["status"] == "replaced" and row["accuracy_new"] > 0.9 and row["fit"]["solver"] == "LinearSVC"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    margins = sess.run(None, {"x": split.x_test})[0]
    assert (margins.argmax(-1) == split.y_test).mean() > 0.95


def _bad(root, name, **arrays):
    path = root / f"{name}.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["no_y", "out_of_range", "shape", "missing_class", "no_head", "zloss_k2",
                                  "fourier_unordered"])
def test_bad_data_is_one_line_exit_2_nothing_written(files, tmp_path, capsys, case):
    root, model_path, split, good, no_head, binary = files
    x, y = split.x_train[:200], split.y_train[:200]
    model, head, data, expect = model_path, "svm", good, ""
    if case == "no_y":
        data, expect = _bad(root, "noy", x=x), "no labels"
    elif case == "out_of_range":
        data, expect = _bad(root, "range", x=x, y=np.where(y == 9, 12, y)), "label 12 is out of range"
    elif case == "shape":
        data, expect = _bad(root, "shape", x=np.zeros((200, 1, 9, 8), np.float32), y=y), "axis 2 differs"
    elif case == "missing_class":
        data, expect = _bad(root, "missing", x=x[y < 9], y=y[y < 9]), "classes [9] have no samples"
    elif case == "no_head":
        model, expect = no_head, "no classifier head"
    elif case == "zloss_k2":
        model, head, data = binary, "zloss", _bad(root, "k2", x=x, y=y % 2)
        expect = "K = 2"
    elif case == "fourier_unordered":
        head, expect = "fourier", "class_order"
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    status, stdout, stderr = _run(["convert", str(model), "-o", str(out), "--head", head, "--fit", str(data),
                                   "--option", "progress=false", "--report", str(report)], capsys)
    assert status == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("softswap: error:") and expect in lines[0], stderr
    assert not out.exists() and not report.exists()
