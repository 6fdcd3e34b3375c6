"""The bad-input corpus (issue 18): every bad or hostile input, through every command, ends the same way —
exit status 2, one stderr line naming the culprit, no traceback, no output (not even a partial or temporary
file), the inputs' bytes unchanged, and no code from a model file executed.

The corpus is built by the ``corpus`` fixture in a temporary folder (no binaries are shipped). Payload files
(pickles whose ``__reduce__`` would create ``PAYLOAD_RAN``) prove that nothing is unpickled unchecked.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from rewrite.cli import main

MARKER = "PAYLOAD_RAN"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file's existence proves code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Block(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def _qkv(shape=(1, 2, 8, 16)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))


def _attention_proto() -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(_Block(), _qkv(), buf, dynamo=False, input_names=["q", "k", "v"], output_names=["y"],
                      opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def _with_payload(good: Path, out: Path, marker: Path, member_suffix: str, config_edit: str | None = None) -> None:
    """Copy ``good`` with the member ending in ``member_suffix`` replaced by a payload pickle (and, for weights,
    its config entry switched to ``use_pickle`` so torch would unpickle it)."""
    payload = pickle.dumps(Payload(str(marker)), protocol=2)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(member_suffix):
                data = payload
            elif config_edit and info.filename.endswith(config_edit):
                config = json.loads(data)
                for entry in config["config"].values():
                    entry["use_pickle"] = True
                data = json.dumps(config).encode()
            zout.writestr(info, data)


def _external_weight_model(folder: Path, location: str) -> Path:
    """y = x @ W with W stored as external data at ``location`` (relative to the model file)."""
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
    tensor = numpy_helper.from_array(w, "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    target = folder / location
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(w.tobytes())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "ext",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [tensor])
    path = folder / "ext.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _graph_model(nodes, inputs, outputs, name: str, folder: Path, opsets=(("", 17),)) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    path = folder / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())  # no checker: these graphs are invalid on purpose
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The corpus folder: good models to start from and every bad file the cases below refer to."""
    root = tmp_path_factory.mktemp("corpus")
    marker = root / MARKER
    proto = _attention_proto()
    onnx.save(proto, root / "good.onnx")
    ep = torch.export.export(_Block(), _qkv())
    torch.export.save(ep, root / "good.pt2")

    class Weighted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, q, k, v):
            return _Block()(self.proj(q), k, v)

    torch.export.save(torch.export.export(Weighted(), _qkv()), root / "weighted.pt2")

    # hostile pickles
    _with_payload(root / "good.pt2", root / "evil_inputs.pt2", marker, "data/sample_inputs/model.pt")
    _with_payload(root / "weighted.pt2", root / "evil_weights.pt2", marker, "data/weights/weight_0",
                  config_edit="model_weights_config.json")
    with zipfile.ZipFile(root / "good.pt2") as zin, zipfile.ZipFile(root / "evil_extra.pt2", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        zout.writestr("good/data/constants/opaque_obj_0", pickle.dumps(Payload(str(marker)), protocol=4))
    torch.save(Payload(str(marker)), root / "evil_ckpt.pt")
    (root / "evil_ckpt_raw.pt").write_bytes(pickle.dumps(Payload(str(marker))))

    # Hugging Face folders: pickled weights with a payload; a config that asks for custom modeling code
    bert = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}
    (root / "hf_evil_bin").mkdir()
    (root / "hf_evil_bin" / "config.json").write_text(json.dumps(bert))
    torch.save(Payload(str(marker)), root / "hf_evil_bin" / "pytorch_model.bin")
    (root / "hf_remote_code").mkdir()
    (root / "hf_remote_code" / "config.json").write_text(json.dumps(
        {**bert, "architectures": ["EvilModel"], "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                              "AutoModel": "evil.EvilModel"}}))
    (root / "hf_remote_code" / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    torch.save({}, root / "hf_remote_code" / "pytorch_model.bin")

    # broken files
    good = (root / "good.onnx").read_bytes()
    (root / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (root / "garbage.onnx").write_bytes(b"\x00\x01garbage" * 10)
    (root / "empty.onnx").write_bytes(b"")
    (root / "text.pt2").write_text("not a zip\n")
    pt2 = (root / "good.pt2").read_bytes()
    (root / "truncated.pt2").write_bytes(pt2[: len(pt2) // 2])
    with zipfile.ZipFile(root / "nomodel.pt2", "w") as z:
        z.writestr("x/readme.txt", "hello")
    torch.save({"w": torch.ones(3)}, root / "weights.pt2")
    (root / "model.txt").write_text("hello")

    # invalid graphs
    f = TensorProto.FLOAT
    x = helper.make_tensor_value_info("x", f, [2, 4])
    y = helper.make_tensor_value_info("y", f, [2, 4])
    _graph_model([helper.make_node("Relu", ["b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2"),
                  helper.make_node("Add", ["x", "b"], ["y"], name="n3")], [x], [y], "cycle", root)
    _graph_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add_ghost")], [x], [y], "undefined", root)

    # custom op after an attention block
    custom = onnx.load_from_string(proto.SerializeToString())
    out_name = custom.graph.output[0].name
    custom.graph.node.append(helper.make_node("FancyOp", [out_name], ["fancy"], name="fancy_node",
                                              domain="com.example"))
    custom.graph.output[0].name = "fancy"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    (root / "custom.onnx").write_bytes(custom.SerializeToString())

    # all dims symbolic
    sym = onnx.load_from_string(proto.SerializeToString())
    for value in list(sym.graph.input) + list(sym.graph.output):
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            dim.ClearField("dim_value")
            dim.dim_param = f"d{i}"
    (root / "symbolic.onnx").write_bytes(sym.SerializeToString())

    # all dims symbolic where the weights fix the feature size: synthetic inputs cannot guess it
    class Projected(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(24, 16)

        def forward(self, q, k, v):
            return _Block()(self.proj(q), k, v)

    buf = io.BytesIO()
    q24 = torch.randn(1, 2, 8, 24)
    torch.onnx.export(Projected(), (q24,) + _qkv()[1:], buf, dynamo=False, input_names=["q", "k", "v"],
                      output_names=["y"], opset_version=17,
                      dynamic_axes={n: {0: "b", 1: "h", 2: "s", 3: "e"} for n in ("q", "k", "v", "y")})
    (root / "symbolic_mismatch.onnx").write_bytes(buf.getvalue())

    # bf16 inputs
    bf = onnx.load_from_string(proto.SerializeToString())
    for value in list(bf.graph.input) + list(bf.graph.output):
        value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    (root / "bf16.onnx").write_bytes(bf.SerializeToString())

    # external data
    (root / "extbad").mkdir()
    missing = _external_weight_model(root / "extbad", "gone/w.bin")
    (root / "extbad" / "gone" / "w.bin").unlink()
    missing.rename(root / "extbad" / "missing_ext.onnx")
    (root / "extshort").mkdir()
    short = _external_weight_model(root / "extshort", "w.bin")
    (root / "extshort" / "w.bin").write_bytes(b"\x00" * 8)
    short.rename(root / "extshort" / "short_ext.onnx")

    # an existing file where --dump-ir wants a folder, a folder where -o wants a file
    (root / "dumpfile").write_text("x")
    (root / "outdir.onnx").mkdir()
    marker.unlink(missing_ok=True)  # building the corpus pickles, never unpickles: nothing may exist yet
    return root


# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {C} = corpus folder, {O} = the test's output folder
    culprit: str  # must appear in the error line

    def args(self, corpus: Path, out: Path) -> list[str]:
        return [a.replace("{C}", str(corpus)).replace("{O}", str(out)) for a in self.argv]


def _model_cases(name: str, culprit: str | None = None) -> list[Case]:
    """A bad model file through every command that reads a model."""
    m = "{C}/" + name
    who = culprit or name
    return [
        Case(f"{name}-inspect", ("inspect", m), who),
        Case(f"{name}-convert", ("convert", m, "-o", "{O}/o.onnx", "--attention", "linear"), who),
        Case(f"{name}-verify-a", ("verify", m, "{C}/good.onnx"), who),
        Case(f"{name}-verify-b", ("verify", "{C}/good.onnx", m), who),
        Case(f"{name}-transfer", ("transfer", m, "-o", "{O}/o.onnx", "--attention", "linear", "--steps", "1",
                                  "--no-progress"), who),
        Case(f"{name}-compile", ("compile", m, "--target", "host", "-o", "{O}/m.so"), who),
        Case(f"{name}-bench", ("bench", m, "--runs", "1"), who),
    ]


MODEL_CASES = [c for name in ("evil_inputs.pt2", "evil_weights.pt2", "evil_extra.pt2", "truncated.onnx",
                              "garbage.onnx", "empty.onnx", "text.pt2", "truncated.pt2", "nomodel.pt2",
                              "weights.pt2", "model.txt", "missing.onnx", "cycle.onnx", "undefined.onnx",
                              "extbad/missing_ext.onnx", "extshort/short_ext.onnx", "hf_evil_bin",
                              "hf_remote_code")
               for c in _model_cases(name, culprit=name.rsplit("/", 1)[-1])]

G = "{C}/good.onnx"
CONVERT = ("convert", G, "-o", "{O}/o.onnx")
TRANSFER = ("transfer", G, "-o", "{O}/o.onnx", "--attention", "linear", "--no-progress")

OPTION_CASES = [
    Case("option-n_ref-negative", CONVERT + ("--attention", "sigmoid", "--option", "n_ref=-1"), "n_ref"),
    Case("option-n_ref-text", CONVERT + ("--attention", "sigmoid", "--option", "n_ref=abc"), "n_ref"),
    Case("option-feature_map-bogus", CONVERT + ("--attention", "linear", "--option", "feature_map=bogus"),
         "feature_map"),
    Case("option-landmarks-zero", CONVERT + ("--attention", "soft", "--option", "num_landmarks=0"), "num_landmarks"),
    Case("option-landmarks-unknown", CONVERT + ("--attention", "soft", "--option", "landmarks=0"), "landmarks"),
    Case("option-eps-nan", CONVERT + ("--attention", "linear", "--option", "eps=nan"), "eps"),
    Case("option-eps-inf", CONVERT + ("--attention", "linear", "--option", "eps=inf"), "eps"),
    Case("option-eps-negative", CONVERT + ("--attention", "linear", "--option", "eps=-1"), "eps"),
    Case("option-chunk-zero", CONVERT + ("--attention", "linear", "--option", "chunk_size=0"), "chunk_size"),
    Case("option-window-negative", CONVERT + ("--attention", "mala", "--option", "window=-3"), "window"),
    Case("option-causal_form-bogus", CONVERT + ("--attention", "linear", "--option", "causal_form=x"),
         "causal_form"),
    Case("option-length_norm-bogus", CONVERT + ("--attention", "sigmoid", "--option", "length_norm=x"),
         "length_norm"),
    Case("option-iterations-negative", CONVERT + ("--attention", "soft", "--option", "iterations=-1"), "iterations"),
    Case("option-ridge-nan", CONVERT + ("--attention", "soft", "--option", "ridge=nan"), "ridge"),
    Case("option-p-nan", CONVERT + ("--attention", "softplus", "--option", "p=nan"), "p"),
    Case("option-bool-bogus", CONVERT + ("--attention", "linear", "--option", "scale_qk=maybe"), "scale_qk"),
    Case("option-malformed", CONVERT + ("--attention", "linear", "--option", "eps"), "eps"),
    Case("option-duplicate", CONVERT + ("--attention", "linear", "--option", "eps=1e-6", "--option", "eps=1e-5"),
         "eps"),
    Case("layers-reversed", CONVERT + ("--attention", "linear", "--layers", "9-2"), "--layers"),
    Case("layers-reversed-small", CONVERT + ("--attention", "linear", "--layers", "1-0"), "--layers"),
    Case("layers-comma", CONVERT + ("--attention", "linear", "--layers", ","), "--layers"),
    Case("layers-empty", CONVERT + ("--attention", "linear", "--layers", ""), "--layers"),
    Case("layers-empty-item", CONVERT + ("--attention", "linear", "--layers", "0,,0"), "--layers"),
    Case("layers-negative", CONVERT + ("--attention", "linear", "--layers", "-1"), "--layers"),
    Case("layers-out-of-range", CONVERT + ("--attention", "linear", "--layers", "5"), "--layers"),
    Case("layers-bad-name", CONVERT + ("--attention", "linear", "--layers", "attnX"), "--layers"),
    Case("keep-reversed", CONVERT + ("--attention", "linear", "--keep-softmax", "9-2"), "--keep-softmax"),
    Case("keep-empty", CONVERT + ("--attention", "linear", "--keep-softmax", ","), "--keep-softmax"),
    Case("variant-unknown", CONVERT + ("--attention", "nonsense",), "nonsense"),
    Case("nothing-to-do", CONVERT, "--attention"),
    Case("output-is-dir", ("convert", G, "-o", "{C}/outdir.onnx", "--attention", "linear"), "outdir.onnx"),
    Case("output-missing-folder", ("convert", G, "-o", "{O}/no/o.onnx", "--attention", "linear"), "o.onnx"),
    Case("output-bad-suffix", ("convert", G, "-o", "{O}/o.txt", "--attention", "linear"), "o.txt"),
    Case("output-is-input", ("convert", G, "-o", G, "--attention", "linear"), "good.onnx"),
    Case("dump-ir-is-file", CONVERT + ("--attention", "linear", "--dump-ir", "{C}/dumpfile"), "dumpfile"),
    Case("report-missing-folder", CONVERT + ("--attention", "linear", "--report", "{O}/no/r.json"), "r.json"),
    Case("custom-op-convert", ("convert", "{C}/custom.onnx", "-o", "{O}/o.onnx", "--attention", "linear"),
         "custom.onnx"),
    Case("custom-op-transfer", ("transfer", "{C}/custom.onnx", "-o", "{O}/o.onnx", "--attention", "linear",
                                "--steps", "1", "--no-progress"), "custom.onnx"),
    Case("symbolic-convert", ("convert", "{C}/symbolic_mismatch.onnx", "-o", "{O}/o.onnx", "--attention", "linear"),
         "symbolic_mismatch.onnx"),
    Case("symbolic-verify", ("verify", "{C}/symbolic_mismatch.onnx", "{C}/symbolic_mismatch.onnx"),
         "symbolic_mismatch.onnx"),
    Case("symbolic-transfer", ("transfer", "{C}/symbolic_mismatch.onnx", "-o", "{O}/o.onnx", "--attention",
                               "linear", "--steps", "1", "--no-progress"), "symbolic_mismatch.onnx"),
    Case("bf16-convert", ("convert", "{C}/bf16.onnx", "-o", "{O}/o.onnx", "--attention", "linear"), "bf16.onnx"),
    Case("bf16-verify", ("verify", "{C}/bf16.onnx", "{C}/bf16.onnx"), "bf16.onnx"),
    Case("transfer-steps-text", TRANSFER + ("--steps", "abc"), "--steps"),
    Case("unknown-flag", ("convert", G, "-o", "{O}/o.onnx", "--attention", "linear", "--bogus"), "--bogus"),
    Case("missing-required", ("convert", G, "--attention", "linear"), "-o"),
    Case("unknown-command", ("frobnicate", G), "frobnicate"),
    Case("transfer-steps-negative", TRANSFER + ("--steps", "-1"), "--steps"),
    Case("transfer-window-negative", TRANSFER + ("--hybrid-window", "-1"), "--hybrid-window"),
    Case("transfer-batch-zero", TRANSFER + ("--batch-size", "0"), "--batch-size"),
    Case("transfer-samples-zero", TRANSFER + ("--max-samples", "0"), "--max-samples"),
    Case("transfer-lr-nan", TRANSFER + ("--lr", "nan"), "--lr"),
    Case("transfer-minutes-nan", TRANSFER + ("--minutes", "nan"), "--minutes"),
    Case("transfer-layers-reversed", TRANSFER + ("--layers", "9-2"), "--layers"),
    Case("transfer-eps-nan", TRANSFER + ("--option", "eps=nan"), "eps"),
    Case("transfer-checkpoint-missing-folder", TRANSFER + ("--checkpoint", "{O}/no/ck.pt"), "ck.pt"),
    Case("transfer-checkpoint-is-dir", TRANSFER + ("--checkpoint", "{C}/extbad"), "extbad"),
    Case("transfer-checkpoint-payload", TRANSFER + ("--steps", "1", "--checkpoint", "{C}/evil_ckpt.pt"),
         "evil_ckpt.pt"),
    Case("transfer-checkpoint-raw-payload", TRANSFER + ("--steps", "1", "--checkpoint", "{C}/evil_ckpt_raw.pt"),
         "evil_ckpt_raw.pt"),
    Case("transfer-data-missing", TRANSFER + ("--data", "{C}/nodata.npz"), "nodata.npz"),
    Case("compile-target-bogus", ("compile", G, "--target", "bogus", "-o", "{O}/m.so"), "bogus"),
    Case("compile-shape-bad", ("compile", G, "--target", "host", "-o", "{O}/m.so", "--shape", "q=1,x"), "q=1,x"),
    Case("compile-shape-negative", ("compile", G, "--target", "host", "-o", "{O}/m.so", "--shape", "q=1,-2,8,16"),
         "q=1,-2,8,16"),
    Case("compile-shape-unknown-input", ("compile", G, "--target", "host", "-o", "{O}/m.so", "--shape", "zz=1"),
         "zz"),
    Case("compile-tune-negative", ("compile", G, "--target", "host", "-o", "{O}/m.so", "--tune", "-1"), "--tune"),
    Case("compile-output-missing-folder", ("compile", G, "--target", "host", "-o", "{O}/no/m.so"), "m.so"),
    Case("bench-runs-zero", ("bench", G, "--runs", "0"), "--runs"),
    Case("bench-json-missing-folder", ("bench", G, "--json", "{O}/no/b.json"), "b.json"),
    Case("run-missing-artefact", ("run", "{C}/none.so", "--inputs", "{C}/none.npz", "-o", "{O}/y.npz"), "none.so"),
    Case("run-not-an-artefact", ("run", "{C}/good.onnx", "--inputs", "{C}/none.npz", "-o", "{O}/y.npz"),
         "good.onnx"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (folders as ``<dir>``)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _check(case: Case, corpus: Path, out: Path, capsys) -> None:
    before = _snapshot(corpus)
    capsys.readouterr()
    status = main(case.args(corpus, out))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, f"{case.id}: exit {status}; stderr: {captured.err[-2000:]}"
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(lines) == 1, f"{case.id}: {len(lines)} stderr lines: {captured.err[-2000:]}"
    assert lines[0].startswith("softswap: error: ")
    assert case.culprit in lines[0], f"{case.id}: culprit {case.culprit!r} not named: {lines[0]}"
    assert not (corpus / MARKER).exists(), f"{case.id}: a payload from the model file ran"
    assert _snapshot(out) == {}, f"{case.id}: output written: {_snapshot(out)}"
    assert _snapshot(corpus) == before, f"{case.id}: the corpus changed"


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.id)
def test_bad_model(case: Case, corpus: Path, tmp_path: Path, capsys) -> None:
    _check(case, corpus, tmp_path, capsys)


@pytest.mark.parametrize("case", OPTION_CASES, ids=lambda c: c.id)
def test_bad_option_or_path(case: Case, corpus: Path, tmp_path: Path, capsys) -> None:
    _check(case, corpus, tmp_path, capsys)


# --------------------------------------------------------------------------------------------------------------
# awkward but valid: external data in a sub-folder, resolved against the model file, never the working directory
@pytest.fixture(scope="module")
def external_model(tmp_path_factory) -> Path:
    """``model/ext.onnx`` (an attention block with a projection) whose weights live in ``model/extok/wq.bin``."""
    from onnx.external_data_helper import convert_model_to_external_data

    class Projected(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq = torch.nn.Linear(16, 16)

        def forward(self, q, k, v):
            return _Block()(self.wq(q), k, v)

    buf = io.BytesIO()
    torch.onnx.export(Projected(), _qkv(), buf, dynamo=False, input_names=["q", "k", "v"], output_names=["y"],
                      opset_version=17)
    proto = onnx.load_from_string(buf.getvalue())
    folder = tmp_path_factory.mktemp("ext") / "model"
    (folder / "extok").mkdir(parents=True)
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="extok/wq.bin", size_threshold=0)
    onnx.save(proto, folder / "ext.onnx")
    return folder / "ext.onnx"


@pytest.mark.parametrize("cwd", ["elsewhere", "model folder"])
def test_external_data_in_a_subfolder(external_model: Path, tmp_path: Path, cwd: str, monkeypatch, capsys) -> None:
    import onnxruntime as ort
    folder = external_model.parent
    before = _snapshot(folder)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(folder if cwd == "model folder" else work)
    model = os.path.relpath(external_model)
    assert main(["inspect", model]) == 0
    out = tmp_path / "out.onnx"
    assert main(["convert", model, "-o", str(out), "--attention", "linear"]) == 0
    onnx.checker.check_model(str(out))  # the output carries its weights; nothing points into the input's folder
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert main(["verify", model, str(out)]) == 0
    out2 = tmp_path / "fit.onnx"
    assert main(["transfer", model, "-o", str(out2), "--attention", "linear", "--steps", "2", "--no-progress"]) == 0
    onnx.checker.check_model(str(out2))
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.onnx", "out.onnx", "work"]
    assert not list(work.iterdir())


# --------------------------------------------------------------------------------------------------------------
# as a user runs it: a separate process, so lines a dependency writes straight to file descriptor 2 (onnxruntime
# and TVM log from C++) count too
SUBPROCESS_IDS = ("evil_inputs.pt2-convert", "custom-op-convert", "symbolic-verify", "cycle.onnx-compile",
                  "option-eps-nan")


@pytest.mark.parametrize("case_id", SUBPROCESS_IDS)
def test_bad_input_in_a_subprocess(case_id: str, corpus: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    case = next(c for c in MODEL_CASES + OPTION_CASES if c.id == case_id)
    before = _snapshot(corpus)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, TVM_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "rewrite.cli", *case.args(corpus, tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("softswap: error: ") and case.culprit in lines[0], proc.stderr
    assert not (corpus / MARKER).exists()
    assert _snapshot(tmp_path) == {} and _snapshot(corpus) == before
