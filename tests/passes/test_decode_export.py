"""Decode export (``softswap convert --attention linear --decode``) of the zoo's GPT-2 and Llama-GQA as causal LMs:
64 greedy tokens from prefill + step graphs in onnxruntime equal the tokens of re-running the ordinary converted
model (``softswap convert``, torch) on the growing sequence, logits within 1e-4; the state's shapes do not depend on
the position; the same for MALA (its state adds Σv and the count); transferred (non-initial) Hedgehog parameters
carry over; ``softswap generate --json``; refusals (one line, exit 2, nothing written).

The LMs use the zoo configs (tests/zoo.py ``_gpt2`` / ``_llama``) with an LM head, 128 positions (prompt + 64 new
tokens exceed the zoo's 64) and weights drawn with std 0.3, so greedy decoding does not collapse onto one token.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_models import (NEW, PROMPT, _lm, _max_err, _reference_tokens,  # noqa: E402,F401
                           _reference_tokens_from, lm_folders)

from passes.decode import DecodeSession, export_decode, generate  # noqa: E402
from rewrite import api  # noqa: E402
from rewrite.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def decoded(lm_folders, tmp_path_factory):
    """family → (decode folder, convert report). GPT-2 through the CLI, Llama through the API."""
    root = tmp_path_factory.mktemp("decoded")
    result = {}
    gpt2 = root / "gpt2_dec"
    assert main(["convert", str(lm_folders["gpt2"]), "-o", str(gpt2), "--attention", "linear", "--decode",
                 "--report", str(root / "gpt2.json"), "--json"]) == 0
    result["gpt2"] = (gpt2, json.loads((root / "gpt2.json").read_text()))
    llama = root / "llama_dec"
    _, report = api.convert(lm_folders["llama"], llama, attention="linear", decode=True)
    result["llama"] = (llama, report)
    return result


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_tokens_equal_full_converted_model(family, lm_folders, decoded):
    folder, report = decoded[family]
    assert {p.name for p in folder.iterdir()} >= {"prefill.onnx", "step.onnx", "decode.json"}
    assert report["passes"][0]["replaced"] == 2
    converted, _ = api.convert(lm_folders[family], None, attention="linear", verify=False)  # the ordinary convert
    ref_toks, ref_logits = _reference_tokens(converted.ep.module(), PROMPT, NEW)
    out = generate(folder, PROMPT, NEW, stop_at_eos=False, keep_logits=True)
    assert len(set(ref_toks)) >= 3  # the comparison is not over a constant sequence
    assert out.tokens == ref_toks
    assert _max_err(out.logits, ref_logits) <= 1e-4


def test_mala_greedy_tokens_equal_full_converted_model(lm_folders, tmp_path):
    """MALA's state adds v = Σ v_j and the count n; GQA Llama, 64 tokens, same check as for linear."""
    converted, report = export_decode(lm_folders["llama"], tmp_path / "dec", attention="mala")
    assert [s["name"] for s in report["decode"]["state"][:4]] == ["state.0.S", "state.0.z", "state.0.v", "state.0.n"]
    assert report["decode"]["state"][2]["shape"] == ["batch", 2, 1, 16]
    reference, _ = api.convert(lm_folders["llama"], None, attention="mala", verify=False)
    ref_toks, ref_logits = _reference_tokens(reference.ep.module(), PROMPT, NEW)
    out = generate(tmp_path / "dec", PROMPT, NEW, stop_at_eos=False, keep_logits=True)
    assert len(set(ref_toks)) >= 3
    assert out.tokens == ref_toks and _max_err(out.logits, ref_logits) <= 1e-4


def test_state_shapes_do_not_depend_on_position(decoded):
    folder, report = decoded["llama"]
    manifest = json.loads((folder / "decode.json").read_text())
    assert manifest["family"] == "llama" and manifest["kv_heads"] == 2
    want = [tuple(s["shape"][1:]) for s in manifest["state"]]
    assert want[0] == (2, 16, 16) and want[1] == (2, 16, 1)  # GQA: state per KV head, F = E = head_dim
    import onnx
    for graph in ("prefill.onnx", "step.onnx"):
        m = onnx.load(str(folder / graph), load_external_data=False)
        outs = {o.name: o for o in m.graph.output}
        for s, shape in zip(manifest["state"], want):
            dims = outs[s["output"]].type.tensor_type.shape.dim
            assert tuple(d.dim_value for d in dims[1:]) == shape and not dims[0].dim_value  # batch symbolic
    sess = DecodeSession(folder)
    shapes = set()
    for n in (3, 40):
        _, states = sess.prefill(np.arange(1, n + 1, dtype=np.int64)[None] % 100)
        _, states = sess.step(np.asarray([[7]], dtype=np.int64), n, states)
        shapes.add(tuple(s.shape for s in states))
    assert shapes == {tuple((1, *w) for w in want)}


def test_transferred_hedgehog_params_carry_over(lm_folders, tmp_path):
    """Non-initial per-site parameters (as `softswap transfer` fits them) reach the step graph: GQA Llama with a
    Hedgehog map (per-query-head φ_k, so the state keeps all 4 heads) equals the converted model with the same
    parameters; with the initial parameters the tokens differ."""
    from passes.attention.featuremaps import init_hedgehog
    from rewrite.attention_pass import AttentionRewritePass
    from passes.attention import get_variant
    from rewrite.io import load_model
    g = torch.Generator().manual_seed(5)
    params = {f"attn{i}": {"fmap_q": init_hedgehog(4, 16) + 0.5 * torch.randn(4, 16, 16, generator=g),
                           "fmap_k": init_hedgehog(4, 16) + 0.5 * torch.randn(4, 16, 16, generator=g)}
              for i in range(2)}
    opts = {"feature_map": "hedgehog"}
    converted, report = export_decode(lm_folders["llama"], tmp_path / "dec", options=opts, params=params)
    assert report["decode"]["state"][0]["shape"] == ["batch", 4, 32, 16]
    ref = AttentionRewritePass(get_variant("linear"), opts, params=params).run(load_model(lm_folders["llama"])).model
    ref_toks, ref_logits = _reference_tokens(ref.ep.module(), PROMPT, 16)
    out = generate(tmp_path / "dec", PROMPT, 16, stop_at_eos=False, keep_logits=True)
    assert out.tokens == ref_toks and _max_err(out.logits, ref_logits) <= 1e-4
    init_toks, _ = _reference_tokens(
        AttentionRewritePass(get_variant("linear"), opts).run(load_model(lm_folders["llama"])).model.ep.module(),
        PROMPT, 16)
    assert init_toks != ref_toks  # the parameters matter, so equality above is evidence they carried over


def test_one_token_prompt_is_a_step_from_zero_state(lm_folders, decoded):
    """The prefill graph takes N >= 2; a one-token prompt runs the step from the zero state at position 0."""
    folder, _ = decoded["gpt2"]
    converted, _ = api.convert(lm_folders["gpt2"], None, attention="linear", verify=False)
    ref_toks, ref_logits = _reference_tokens_from([5], converted.ep.module(), 12)
    out = generate(folder, [5], 12, stop_at_eos=False, keep_logits=True)
    assert out.tokens == ref_toks and _max_err(out.logits, ref_logits) <= 1e-4


def test_cli_generate_json(decoded, capsys):
    folder, _ = decoded["gpt2"]
    want = generate(folder, PROMPT, 10, stop_at_eos=False).tokens
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt-ids", "5,17,42", "--max-new-tokens", "10", "--ignore-eos",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tokens": want}
    assert main(["generate", str(folder), "--prompt-ids", "5,17,42", "--max-new-tokens", "10", "--ignore-eos"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want]


@pytest.mark.parametrize("args, culprit", [
    (["--prompt-ids", "5,x"], "--prompt-ids"),
    (["--prompt-ids", "5,17,400"], "outside the vocabulary"),
    (["--prompt-ids", "5,17", "--max-new-tokens", "500"], "positions"),
    (["--prompt-ids", ""], "--prompt-ids"),
    (["--prompt", "hello"], "tokenizer"),
])
def test_cli_generate_refusals(decoded, capsys, args, culprit):
    folder, _ = decoded["gpt2"]
    assert main(["generate", str(folder), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err


def _bert_folder(root: Path) -> Path:
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    return root / "bert"


def test_convert_decode_refusals(lm_folders, tmp_path, capsys):
    from transformers import GPT2Model
    cases = [
        ([str(_bert_folder(tmp_path)), "--attention", "linear"], "bert"),  # encoder: unsupported family
        ([str(lm_folders["gpt2"]), "--attention", "sigmoid"], "no decode form"),
        ([str(lm_folders["gpt2"]), "--attention", "linear", "--head", "svm"], "--head"),
    ]
    base = tmp_path / "gpt2_base"
    GPT2Model(_lm("gpt2").config).save_pretrained(base)
    cases.append(([str(base), "--attention", "linear"], "LM head"))
    capsys.readouterr()  # save_pretrained's progress bars
    for i, (args, culprit) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["convert", *args, "-o", str(out), "--decode"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and culprit in err, err
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_tvm_compiled_step_generates_the_same_tokens(decoded, tmp_path, capsys):
    """`softswap compile` of step.onnx (symbolic batch, TVM, host CPU): greedy decoding with the compiled step gives
    the onnxruntime tokens, logits within 1e-4."""
    pytest.importorskip("tvm")
    folder, _ = decoded["llama"]
    lib = tmp_path / "step.so"
    assert main(["compile", str(folder / "step.onnx"), "--target", "host", "-o", str(lib)]) == 0
    want = generate(folder, PROMPT, 16, stop_at_eos=False, keep_logits=True)
    got = generate(DecodeSession(folder, step_library=lib), PROMPT, 16, stop_at_eos=False, keep_logits=True)
    assert got.tokens == want.tokens
    assert _max_err(got.logits, [torch.from_numpy(x) for x in want.logits]) <= 1e-4
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt-ids", "5,17,42", "--max-new-tokens", "16", "--ignore-eos",
                 "--step-library", str(lib), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tokens": want.tokens}


def test_tvm_compiled_prefill_matches_onnxruntime(decoded, tmp_path):
    """`softswap compile` of prefill.onnx (GPT-2, the chunked causal form by default, batch and length symbolic):
    one artefact gives onnxruntime's logits and every layer's state at three (batch, length) pairs, lengths not
    multiples of the chunk, 1e-4."""
    pytest.importorskip("tvm")
    import onnxruntime as ort
    from targets import Runner

    folder, _ = decoded["gpt2"]
    lib = tmp_path / "prefill.so"
    assert main(["compile", str(folder / "prefill.onnx"), "--target", "host", "-o", str(lib)]) == 0
    runner = Runner(lib)
    sess = ort.InferenceSession(str(folder / "prefill.onnx"), providers=["CPUExecutionProvider"])
    for b, n in ((1, 7), (3, 45), (2, 100)):
        rng = np.random.default_rng(n)
        feeds = {"input_ids": rng.integers(0, 100, (b, n)).astype(np.int64),
                 "positions": np.tile(np.arange(n, dtype=np.int64), (b, 1))}
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        got = runner.run(feeds)
        assert sorted(got) == sorted(want) and any(k.startswith("next_state.") for k in want)
        for name, w in want.items():
            assert got[name].shape == w.shape, name
            assert _max_err([got[name]], [torch.from_numpy(w)]) <= 1e-4, (name, b, n)


def test_tvm_add_of_length1_matmul(tmp_path):
    """The pattern the step graph first had (S + φ(k)ᵀv for one token): onnxruntime vs the compiled artefact. (The
    CPU injective rule once inlined the Add into the K = 1 matmul, adding S to the init and again to the update.)"""
    pytest.importorskip("tvm")
    import onnxruntime as ort
    from targets import Runner

    class M(torch.nn.Module):
        def forward(self, s, a, b):
            return s + a.transpose(-1, -2) @ b

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 1, 8, generator=g),
            torch.randn(2, 4, 1, 8, generator=g))
    torch.onnx.export(M(), args, str(tmp_path / "m.onnx"), dynamo=True, input_names=["s", "a", "b"],
                      output_names=["y"])
    assert main(["compile", str(tmp_path / "m.onnx"), "--target", "host", "-o", str(tmp_path / "m.so")]) == 0
    feeds = {n: x.numpy() for n, x in zip(("s", "a", "b"), args)}
    want = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = Runner(tmp_path / "m.so").run(feeds)["y"]
    assert np.abs(got - want).max() <= 1e-5


def test_generate_with_prompt_text(tmp_path, capsys):
    """Tokenizer files of the model folder are copied into the decode folder; ``--prompt TEXT`` tokenizes the text
    with them and ``--json`` adds the decoded text. A GPT-2 LM whose vocabulary is the bundled MiniLM tokenizer's."""
    import shutil

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rewrite.hf import minilm_path
    src = minilm_path()
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                               eos_token_id=tok.sep_token_id)).save_pretrained(tmp_path / "lm")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(src / name, tmp_path / "lm" / name)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "lm"), "-o", str(tmp_path / "dec"), "--attention", "linear", "--decode",
                 "--no-verify", "--json"]) == 0
    assert json.loads((tmp_path / "dec" / "decode.json").read_text())["tokenizer"] is True
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "dec"), "--prompt", "linear attention is", "--max-new-tokens", "6",
                 "--ignore-eos", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ids = tok("linear attention is")["input_ids"]
    assert got["tokens"] == generate(tmp_path / "dec", ids, 6, stop_at_eos=False).tokens
    assert got["text"] == tok.decode(got["tokens"])
