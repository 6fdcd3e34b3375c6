"""One symbolic-shape artefact for every batch and length (issue #14): the real MiniLM compiled once without
``--shape`` and a linear-attention block with a run-time length, each against onnxruntime at shapes that are not
multiples of the register tiles (batch 1 and > 1); the run-time-shaped softmax kernel against float64; the
symbolic-extent schedules (transpose tiles, K-split with a ragged last chunk) against numpy."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from targets.bench import ort_session
from targets.importer import import_onnx
from targets.pipeline import scheduled_module
from targets.table import get_target


def _close(got: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference, relative to max(1, |want|max) (the compile matrix's 1e-4 criterion)."""
    assert got.shape == want.shape
    return float(np.abs(got.astype(np.float64) - want).max() / max(1.0, float(np.abs(want).max())))


@pytest.fixture(scope="module")
def minilm_dynamic(tmp_path_factory):
    """(ONNX path, Runner) of the real all-MiniLM-L6-v2 compiled for host with batch and length symbolic."""
    import rewrite
    from rewrite.hf import HFLoadError, minilm_path
    from rewrite.io import load_model
    from targets import Runner, compile_model

    try:
        folder = minilm_path()
    except HFLoadError as exc:  # pragma: no cover - the package is a test dependency
        pytest.fail(str(exc))
    tmp = tmp_path_factory.mktemp("minilm_dyn")
    path = tmp / "minilm.onnx"
    rewrite.export(load_model(folder), str(path))
    meta = compile_model(str(path), "host", tmp / "minilm.so",
                         shapes={"input_ids": [(1, 8), (1, 512)]})
    assert meta["ranges"]["input_ids"] == [[1, 8], [1, 512]]
    return path, Runner(tmp / "minilm.so")


@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 37), (2, 128)])
def test_minilm_symbolic_artefact_matches_onnxruntime(minilm_dynamic, batch, seq):
    """Rows and key lengths not a multiple of the 4-row / 2-vector tiles (7, 37), batch 1 and > 1, one padded
    sequence per batch (attention mask zeros): the one artefact equals onnxruntime within 1e-4."""
    path, runner = minilm_dynamic
    rng = np.random.default_rng(batch * 1000 + seq)
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq // 2:] = 0
    feeds = {"input_ids": rng.integers(0, 30000, (batch, seq)).astype(np.int64), "attention_mask": mask,
             "token_type_ids": np.zeros((batch, seq), np.int64)}
    sess = ort_session(str(path), 1)
    feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    want = sess.run(None, feeds)
    got = list(runner.run(feeds).values())
    for w, g in zip(want, got):
        assert _close(g, w) <= 1e-4


def _linear_attention_onnx(path):
    """The catalogue's non-causal linear attention over q, k, v (1, 8, n, 64), exported with n symbolic."""
    import torch
    from torch.export import Dim

    from passes.attention import VARIANTS
    from rewrite.io import quiet_stdout

    class Linear(torch.nn.Module):
        def forward(self, q, k, v):
            return VARIANTS["linear"].fn(q, k, v, scale=0.125, causal=False, key_padding=None)

    q, k, v = (torch.randn(1, 8, 64, 64) for _ in range(3))
    n = Dim("n", min=2, max=65536)
    with quiet_stdout():
        prog = torch.onnx.export(Linear().eval(), (q, k, v), dynamo=True, input_names=["q", "k", "v"],
                                 dynamic_shapes=({2: n}, {2: n}, {2: n}), verbose=False)
    prog.save(str(path))
    return path


def test_linear_attention_symbolic_length_matches_onnxruntime(tmp_path):
    """φ(K)ᵀV and the key sum reduce over the run-time length with the K-split (256-long chunks): lengths with a
    ragged last chunk (300, 1000) and a single short chunk (33) equal onnxruntime within 1e-4."""
    from targets import Runner, compile_model

    path = _linear_attention_onnx(tmp_path / "linear.onnx")
    compile_model(str(path), "host", tmp_path / "linear.so", shapes=None)
    runner = Runner(tmp_path / "linear.so")
    sess = ort_session(str(path), 1)
    rng = np.random.default_rng(1)
    for n in (33, 300, 1000):
        feeds = {name: rng.standard_normal((1, 8, n, 64)).astype(np.float32) for name in ("q", "k", "v")}
        (want,) = sess.run(None, feeds)
        (got,) = runner.run(feeds).values()
        assert _close(got, want) <= 1e-4, n


def test_symbolic_softmax_kernel_matches_float64():
    """The run-time-shaped fused three-pass kernel: rows and lengths of any size (1, vector tails, unroll tails),
    a fully masked row (uniform) and a half-masked row (-inf), against float64."""
    import tvm

    from targets.softmax_kernels import make_symbolic_softmax_kernel, vector_bits_of

    tgt = get_target("host")
    f = make_symbolic_softmax_kernel(vector_bits_of(tgt) // 32).with_attr("global_symbol", "softmax")
    lib = tvm.compile(tvm.IRModule({"softmax": f}), target=tgt)
    rng = np.random.default_rng(2)
    for rows, cols in ((1, 1), (3, 5), (7, 16), (70, 129), (5, 1000)):
        x = (rng.standard_normal((rows, cols)) * 4).astype(np.float32)
        x[0, : cols // 2] = -np.inf
        if rows > 1:
            x[1] = -np.inf
        y = tvm.runtime.tensor(np.full_like(x, np.nan))
        lib["softmax"](tvm.runtime.tensor(x), y)
        got = y.numpy()
        e = np.exp(x.astype(np.float64) - np.where(np.isinf(x).all(-1, keepdims=True), 0,
                                                   x.max(-1, keepdims=True)))
        want = np.where(np.isinf(x).all(-1, keepdims=True), 1.0 / cols, e / np.maximum(e.sum(-1, keepdims=True),
                                                                                     1e-300))
        assert np.isfinite(got).all(), (rows, cols)
        assert np.abs(got - want).max() <= 1e-6, (rows, cols)
    # an empty batch (0 rows) is a no-op, not a division by zero in the rows-per-task arithmetic
    lib["softmax"](tvm.runtime.tensor(np.zeros((0, 8), np.float32)), tvm.runtime.tensor(np.zeros((0, 8), np.float32)))


def _transpose_model(shape, perm):
    out = [shape[p] for p in perm]
    g = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=perm)], "tr",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shape,perm", [((8, "n", 64), (0, 2, 1)), (("b", "n", 12, 32), (0, 2, 1, 3)),
                                        ((8, 64, "n"), (0, 2, 1))])
def test_symbolic_transposes_match_numpy(shape, perm, tmp_path):
    """Transposes with a run-time extent: tiled (static axis in 16s; 16 x 16 tiles with vector stores along the
    run-time axis when it is the output's innermost, the ragged last tile guarded) or fused over the static tail,
    parallel; numbers equal numpy at lengths below, at and between whole tiles."""
    from targets import Runner, compile_model

    model = _transpose_model(shape, perm)
    text = "\n".join(f.script() for _, f in scheduled_module(import_onnx(model).mod, get_target("host"))
                     .functions_items() if "transpose" in _.name_hint)
    assert "T.parallel(" in text
    if shape == (8, "n", 64):  # the run-time axis becomes the output's innermost: stored as whole vectors
        assert "T.vectorized(" in text and "T.likely(" in text
    compile_model(model, "host", tmp_path / "t.so", shapes=None)
    runner = Runner(tmp_path / "t.so")
    rng = np.random.default_rng(3)
    for n in (1, 16, 37, 64):
        dims = [n if d == "n" else 3 if d == "b" else d for d in shape]
        x = rng.standard_normal(dims).astype(np.float32)
        (got,) = runner.run({"x": x}).values()
        np.testing.assert_array_equal(got, x.transpose(perm))
