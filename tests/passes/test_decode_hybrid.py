"""Decode export of the sliding-window hybrid (``--attention linear|mala --option window=W --decode``).

The state of a hybrid layer is the linear/MALA sums over the keys that left the window plus the last W keys/values
as a shift buffer with a slot mask. Checked against independent references:
- eager, one layer (fp64): prompt + steps of :class:`passes.decode.state.LinearLayerState` equal the variant's own
  full causal output (the hybrid formula of ``softswap convert``) on the whole sequence, for linear and MALA, GQA,
  W = 1 and 3, prompts shorter and longer than W;
- whole models: 64 greedy tokens from prefill + step in onnxruntime equal re-running the ordinary converted model
  (``softswap convert --option window=W``, torch) on the growing sequence, logits within 1e-4, for the zoo's GPT-2
  (prompt shorter than W: partly filled buffer) and Llama-GQA (prompt longer than W: the prefill folds the keys
  that left the window into S, z); the window changes the tokens' logits (it is not a no-op); state shapes do not
  depend on the position; the TVM-compiled step gives the onnxruntime tokens.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_models import NEW, _max_err, _reference_tokens, _reference_tokens_from, lm_folders  # noqa: E402,F401

from passes.attention import get_variant  # noqa: E402
from passes.decode import DecodeSession, export_decode, generate  # noqa: E402
from passes.decode.state import LinearLayerState  # noqa: E402
from rewrite import api  # noqa: E402
from rewrite.cli import main  # noqa: E402

LONG_PROMPT = [5, 17, 42, 9, 33, 71, 2, 60, 8]  # 9 tokens > W = 4


def _site(name: str, window: int, heads: int, d: int, seed: int) -> SimpleNamespace:
    variant = get_variant(name)
    opts = {o.name: o.default for o in variant.options}
    opts["window"] = window
    params = variant.init_params(heads, d, opts)
    params["window_gate"] = torch.randn(heads, generator=torch.Generator().manual_seed(seed)).double()
    return SimpleNamespace(variant=variant, spec=SimpleNamespace(scale=d ** -0.5), options=opts, params=params)


@pytest.mark.parametrize("name", ["linear", "mala"])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("prompt", [2, 7])
def test_layer_prompt_and_steps_equal_full_hybrid(name, window, prompt):
    """One GQA layer (4 query / 2 KV heads), fp64: the prompt's output and state, then one step per token, give the
    full causal hybrid output of the variant function at every position (1e-10)."""
    h, hkv, d, n = 4, 2, 8, 12
    g = torch.Generator().manual_seed(window * 10 + prompt)
    q = torch.randn(1, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, hkv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, hkv, n, d, generator=g, dtype=torch.float64)
    site = _site(name, window, h, d, seed=window)
    layer = LinearLayerState(site, h, hkv)
    assert layer.parts[-3:] == ("win_k", "win_v", "win_m")
    full = site.variant.fn(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=site.spec.scale,
                           causal=True, key_padding=None, params=site.params, **site.options)
    y, *state = layer.prompt(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    outs = [y]
    shapes = {tuple(s.shape) for s in state}
    for t in range(prompt, n):
        y, *state = layer.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], *state)
        outs.append(y)
        assert {tuple(s.shape) for s in state} == shapes
    assert torch.allclose(torch.cat(outs, dim=2), full, atol=1e-10, rtol=0)
    # the window matters: the pure operator (window 0) differs
    plain = {**site.options, "window": 0}
    other = site.variant.fn(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), scale=site.spec.scale,
                            causal=True, key_padding=None, params=None, **plain)
    assert (other - full).abs().max() > 1e-3


@pytest.fixture(scope="module")
def hybrid_llama(lm_folders, tmp_path_factory):
    """Llama-GQA, linear, W = 4, through the API."""
    out = tmp_path_factory.mktemp("hybrid_dec") / "llama"
    _, report = api.convert(lm_folders["llama"], out, attention="linear", options={"window": 4}, decode=True)
    return out, report


def _check_tokens(folder: Path, reference, plain, prompt: list[int]) -> None:
    ref_toks, ref_logits = _reference_tokens(reference.ep.module(), prompt, NEW)
    out = generate(folder, prompt, NEW, stop_at_eos=False, keep_logits=True)
    assert len(set(ref_toks)) >= 3  # not a constant sequence
    assert out.tokens == ref_toks
    assert _max_err(out.logits, ref_logits) <= 1e-4
    # the window is not a no-op: on the generated sequence the model without it gives other logits
    seq = torch.tensor([prompt + ref_toks])
    with torch.no_grad():
        a = reference.ep.module()(input_ids=seq, attention_mask=torch.ones_like(seq))[0]
        b = plain.ep.module()(input_ids=seq, attention_mask=torch.ones_like(seq))[0]
    assert (a - b).abs().max() > 1e-2


def test_llama_hybrid_greedy_tokens_equal_full_converted_model(lm_folders, hybrid_llama):
    """Prompt of 9 tokens > W = 4: the prefill hands over S, z of the first 5 keys and the last 4 in the buffer."""
    folder, report = hybrid_llama
    manifest = report["decode"]
    assert manifest["window"] == 4 and report["passes"][0]["replaced"] == 2
    assert [s["name"] for s in manifest["state"][:5]] == ["state.0.S", "state.0.z", "state.0.win_k",
                                                          "state.0.win_v", "state.0.win_m"]
    reference, _ = api.convert(lm_folders["llama"], None, attention="linear", options={"window": 4}, verify=False)
    plain, _ = api.convert(lm_folders["llama"], None, attention="linear", verify=False)
    _check_tokens(folder, reference, plain, LONG_PROMPT)


def test_gpt2_hybrid_cli_tokens_equal_full_converted_model(lm_folders, tmp_path, capsys):
    """GPT-2 through the CLI, W = 5 > the 3-token prompt (the prefill's buffer is partly empty), and a one-token
    prompt (a step from the zero state: an empty buffer)."""
    out = tmp_path / "dec"
    assert main(["convert", str(lm_folders["gpt2"]), "-o", str(out), "--attention", "linear", "--hybrid-window",
                 "5", "--decode", "--no-verify", "--json"]) == 0
    capsys.readouterr()
    assert json.loads((out / "decode.json").read_text())["window"] == 5
    reference, _ = api.convert(lm_folders["gpt2"], None, attention="linear", options={"window": 5}, verify=False)
    plain, _ = api.convert(lm_folders["gpt2"], None, attention="linear", verify=False)
    _check_tokens(out, reference, plain, [5, 17, 42])
    ref_toks, ref_logits = _reference_tokens_from([5], reference.ep.module(), 12)
    got = generate(out, [5], 12, stop_at_eos=False, keep_logits=True)
    assert got.tokens == ref_toks and _max_err(got.logits, ref_logits) <= 1e-4


def test_mala_hybrid_greedy_tokens_equal_full_converted_model(lm_folders, tmp_path):
    """MALA hybrid on Llama-GQA (W = 4, 9-token prompt): sums S, z, v, n over the keys outside the window."""
    _, report = export_decode(lm_folders["llama"], tmp_path / "dec", attention="mala", options={"window": 4})
    assert [s["name"] for s in report["decode"]["state"][:7]] == [
        "state.0.S", "state.0.z", "state.0.v", "state.0.n", "state.0.win_k", "state.0.win_v", "state.0.win_m"]
    reference, _ = api.convert(lm_folders["llama"], None, attention="mala", options={"window": 4}, verify=False)
    plain, _ = api.convert(lm_folders["llama"], None, attention="mala", verify=False)
    _check_tokens(tmp_path / "dec", reference, plain, LONG_PROMPT)


def test_hybrid_state_shapes_do_not_depend_on_position(hybrid_llama):
    folder, _ = hybrid_llama
    manifest = json.loads((folder / "decode.json").read_text())
    want = [tuple(s["shape"][1:]) for s in manifest["state"]]
    assert want[:5] == [(2, 16, 16), (2, 16, 1), (2, 4, 16), (2, 4, 16), (1, 4, 1)]  # buffers [B, H_kv, W, d]
    import onnx
    for graph in ("prefill.onnx", "step.onnx"):
        m = onnx.load(str(folder / graph), load_external_data=False)
        outs = {o.name: o for o in m.graph.output}
        for s, shape in zip(manifest["state"], want):
            dims = outs[s["output"]].type.tensor_type.shape.dim
            assert tuple(d.dim_value for d in dims[1:]) == shape and not dims[0].dim_value  # batch symbolic
    sess = DecodeSession(folder)
    shapes = set()
    for n in (2, 3, 40):  # buffer partly filled, and full with keys folded into S, z
        _, states = sess.prefill(np.arange(1, n + 1, dtype=np.int64)[None] % 100)
        shapes.add(tuple(s.shape for s in states))
        masks = states[4]
        assert masks.sum() == min(n, 4)  # win_m counts the keys in the window
        _, states = sess.step(np.asarray([[7]], dtype=np.int64), n, states)
        shapes.add(tuple(s.shape for s in states))
    assert shapes == {tuple((1, *w) for w in want)}


def test_tvm_compiled_hybrid_step_generates_the_same_tokens(hybrid_llama, tmp_path):
    """`softswap compile` of the hybrid step graph (TVM, host CPU, symbolic batch): greedy decoding with it gives
    the onnxruntime tokens, logits within 1e-4."""
    pytest.importorskip("tvm")
    folder, _ = hybrid_llama
    lib = tmp_path / "step.so"
    assert main(["compile", str(folder / "step.onnx"), "--target", "host", "-o", str(lib)]) == 0
    want = generate(folder, LONG_PROMPT, 16, stop_at_eos=False, keep_logits=True)
    got = generate(DecodeSession(folder, step_library=lib), LONG_PROMPT, 16, stop_at_eos=False, keep_logits=True)
    assert got.tokens == want.tokens
    assert _max_err(got.logits, [torch.from_numpy(x) for x in want.logits]) <= 1e-4


def test_hybrid_window_flag_conflicts_with_option(lm_folders, tmp_path, capsys):
    """--hybrid-window W is --option window=W; both at once is refused (one line, exit 2, nothing written)."""
    out = tmp_path / "dec"
    assert main(["convert", str(lm_folders["gpt2"]), "-o", str(out), "--attention", "linear", "--hybrid-window",
                 "4", "--option", "window=8", "--decode"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--hybrid-window" in err and not out.exists()
