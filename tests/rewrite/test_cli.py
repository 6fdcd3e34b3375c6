"""The `softswap` command end to end on small real graphs: inspect --json/--explain, passes, convert (--passes,
--attention, --report, --dump-ir), verify across graph kinds."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rewrite.cli import main


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.out(y.transpose(1, 2).reshape(b, s, 32))


class Probs(torch.nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return p @ v, p


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    x, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool)
    ep = torch.export.export(Block().eval(), (x, mask))
    torch.export.save(ep, root / "block.pt2")
    torch.onnx.export(Block().eval(), (x, mask), root / "block.onnx", dynamo=False, input_names=["x", "mask"],
                      opset_version=17)
    q = torch.randn(1, 2, 8, 8)
    torch.onnx.export(Probs(), (q, q, q), root / "probs.onnx", dynamo=False, input_names=["q", "k", "v"],
                      opset_version=17)
    return root


def test_inspect_json(files, capsys):
    assert main(["inspect", str(files / "block.onnx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (site,) = report["attention_sites"]
    assert {k: site[k] for k in ("causal", "mask", "heads", "kv_heads", "head_dim")} == \
        {"causal": False, "mask": "key_padding", "heads": 4, "kv_heads": 4, "head_dim": 8}
    assert site["scale"] == pytest.approx(8 ** -0.5, rel=1e-6)
    assert report["heads"] == [] and report["unmatched"] == []


def test_inspect_explain_names_the_reason(files, capsys):
    assert main(["inspect", str(files / "probs.onnx"), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "no attention found" in out and "graph output" in out


def test_passes_lists_the_catalogue(capsys):
    assert main(["passes", "--json"]) == 0
    passes = json.loads(capsys.readouterr().out)
    assert {"attention.reference", "attention.linear", "attention.mala", "attention.sigmoid",
            "attention.softplus", "attention.soft"} <= set(passes)
    assert "n_ref" in passes["attention.sigmoid"]["options"]


def test_convert_report_dump_and_cross_kind_verify(files, tmp_path, capsys):
    out, rep, dump = tmp_path / "ref.onnx", tmp_path / "r.json", tmp_path / "ir"
    assert main(["convert", str(files / "block.pt2"), "-o", str(out), "--passes", "attention.reference",
                 "--report", str(rep), "--dump-ir", str(dump)]) == 0
    report = json.loads(rep.read_text())
    assert report["passes"][0]["replaced"] == 1 and report["fidelity"]["max_abs"] < 1e-5
    assert list(dump.glob("00-attention.reference.txt"))
    capsys.readouterr()
    assert main(["verify", str(files / "block.pt2"), str(out), "--json"]) == 0  # FX program vs ONNX file
    data = json.loads(capsys.readouterr().out)
    assert data["max_abs"] < 1e-5 and data["min_cosine"] > 0.999999


def test_convert_with_variant_options(files, tmp_path, capsys):
    out = tmp_path / "sig.onnx"
    assert main(["convert", str(files / "block.onnx"), "-o", str(out), "--attention", "sigmoid",
                 "--option", "n_ref=64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (site,) = report["passes"][0]["sites"]
    assert site["options"]["n_ref"] == 64 and site["status"] == "replaced"
    assert 0 < report["fidelity"]["min_cosine"] < 1
