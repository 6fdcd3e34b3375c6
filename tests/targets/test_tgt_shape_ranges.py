"""`--shape name=lo..hi` ranges: one symbolic artefact, the ranges recorded in its metadata, inputs outside them
refused by `softswap run` / `Runner` (one line naming input, dim and range; exit 2; nothing written)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewrite.cli import main
from targets.errors import InputError
from targets.shape_ranges import check_in_ranges, parse_dim, resolve_ranges

W = (np.arange(32 * 16, dtype=np.float32).reshape(32, 16) % 7 - 3) / 8


def _masked_model() -> onnx.ModelProto:
    """y = Softmax(x @ W + m[..., None]); x (b, n, 32), m (b, n): two inputs sharing the symbols b and n."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
             helper.make_node("Add", ["s", "m3"], ["t"]),
             helper.make_node("Softmax", ["t"], ["y"], axis=-1)]
    graph = helper.make_graph(
        nodes, "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n", 32]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, ["b", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "n", 16])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reference(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    t = x.astype(np.float64) @ W.astype(np.float64) + m[..., None]
    e = np.exp(t - t.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _feeds(rng, b: int, n: int) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((b, n, 32)).astype(np.float32),
            "m": rng.standard_normal((b, n)).astype(np.float32)}


@pytest.mark.parametrize("text, want", [("8", 8), (" 1..4096", (1, 4096)), ("3..3", (3, 3))])
def test_parse_dim(text, want):
    assert parse_dim(text, "x=" + text) == want


@pytest.mark.parametrize("text", ["0", "-2", "5..2", "0..4", "1..", "..8", "a..b", "1...4", ""])
def test_parse_dim_refuses(text):
    with pytest.raises(InputError, match="positive integer or a range"):
        parse_dim(text, "x=" + text)


def test_ranges_follow_shared_symbols_and_refuse_conflicts():
    inputs = [{"name": "x", "shape": ["b", "n", 32]}, {"name": "m", "shape": ["b", "n"]}]
    assert resolve_ranges({"x": [(1, 4), (1, 64), 32]}, inputs) == {"x": [[1, 4], [1, 64], None],
                                                                   "m": [[1, 4], [1, 64]]}
    with pytest.raises(InputError, match="'b'.*1..8.*x dim 0 gives it 1..4"):
        resolve_ranges({"x": [(1, 4), (1, 64), 32], "m": [(1, 8), (1, 64)]}, inputs)
    with pytest.raises(InputError, match="dim 2 is fixed at 32"):
        resolve_ranges({"x": [(1, 4), (1, 64), (1, 32)]}, inputs)


def test_check_in_ranges_names_input_dim_and_range():
    ranges = {"x": [[1, 4], [1, 64], None]}
    check_in_ranges(ranges, "x", (4, 64, 999))  # bounds inclusive; unranged dims free
    check_in_ranges(ranges, "other", (100,))
    with pytest.raises(InputError, match=r"input 'x' dim 1 is 65, outside the range 1\.\.64"):
        check_in_ranges(ranges, "x", (2, 65, 32))


def test_compile_with_ranges_records_and_checks_them(tmp_path, rng, capsys):
    """One artefact from `--shape x=1..4,1..64,32` serves (1, 5) and (4, 64) against numpy; the ranges are in the
    metadata (m gets them through the shared symbols); a length or batch outside them exits 2 with one line naming
    the input, the dim and the range, and writes nothing."""
    from targets import Runner

    path, lib = tmp_path / "m.onnx", tmp_path / "m.so"
    onnx.save(_masked_model(), path)
    assert main(["compile", str(path), "--target", "avx2", "-o", str(lib), "--shape", "x=1..4,1..64,32"]) == 0
    meta = json.loads((tmp_path / "m.so.json").read_text())
    assert meta["ranges"] == {"x": [[1, 4], [1, 64], None], "m": [[1, 4], [1, 64]]}
    assert meta["inputs"][0]["shape"] == ["b", "n", 32]
    capsys.readouterr()
    for b, n in [(1, 5), (4, 64)]:
        feeds = _feeds(rng, b, n)
        np.savez(tmp_path / "x.npz", **feeds)
        assert main(["run", str(lib), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")]) == 0
        with np.load(tmp_path / "y.npz") as got:
            np.testing.assert_allclose(got["y"], _reference(**feeds), rtol=1e-4, atol=1e-5)
    (tmp_path / "y.npz").unlink()
    capsys.readouterr()
    for (b, n), culprit in [((2, 65), "'x' dim 1 is 65, outside the range 1..64"),
                            ((5, 8), "'x' dim 0 is 5, outside the range 1..4")]:
        np.savez(tmp_path / "x.npz", **_feeds(rng, b, n))
        assert main(["run", str(lib), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")]) == 2
        err = capsys.readouterr().err.strip()
        assert culprit in err and len(err.splitlines()) == 1
        assert not (tmp_path / "y.npz").exists()
    feeds = _feeds(rng, 2, 8)
    feeds["m"] = rng.standard_normal((2, 80)).astype(np.float32)  # m's own check (x is within range)
    with pytest.raises(InputError, match=r"'m' dim 1 is 80, outside the range 1\.\.64"):
        Runner(lib).run(feeds)


def test_mixed_fixed_and_ranged_dims(tmp_path, rng):
    """`--shape x=2,1..64,32`: batch fixed at 2 for x and for m (which shares its symbol), length symbolic within
    its range; fixing a shared symbol twice differently is refused."""
    from targets import Runner, compile_model

    path, lib = tmp_path / "m.onnx", tmp_path / "m.so"
    onnx.save(_masked_model(), path)
    meta = compile_model(str(path), "avx2", lib, shapes={"x": [2, (1, 64), 32]})
    assert [i["shape"] for i in meta["inputs"]] == [[2, "n", 32], [2, "n"]]
    assert meta["ranges"] == {"x": [None, [1, 64], None], "m": [None, [1, 64]]}
    runner = Runner(lib)
    for n in (3, 64):
        feeds = _feeds(rng, 2, n)
        np.testing.assert_allclose(runner.run(feeds)["y"], _reference(**feeds), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="'x' has shape"):
        runner.run(_feeds(rng, 3, 4))
    with pytest.raises(InputError, match="'b'.*fixed at 3.*x dim 0 fixes it at 2"):
        compile_model(str(path), "avx2", tmp_path / "other.so", shapes={"x": [2, (1, 64), 32], "m": [3, 8]})


@pytest.mark.parametrize("shape, culprit", [
    ("x=1..4,1..64,1..32", "dim 2 of 'x' is fixed at 32"),
    ("x=1..4,9..2,32", "x=1..4,9..2,32"),
    ("x=1..4,1..64", "has 3 dims, 2 given"),
])
def test_bad_ranges_exit_2_nothing_written(tmp_path, capsys, shape, culprit):
    path, lib = tmp_path / "m.onnx", tmp_path / "m.so"
    onnx.save(_masked_model(), path)
    capsys.readouterr()
    assert main(["compile", str(path), "--target", "avx2", "-o", str(lib), "--shape", shape]) == 2
    err = capsys.readouterr().err.strip()
    assert culprit in err and len(err.splitlines()) == 1
    assert not lib.exists() and not (tmp_path / "m.so.json").exists()


def test_conflicting_ranges_of_one_symbol_exit_2(tmp_path, capsys):
    path, lib = tmp_path / "m.onnx", tmp_path / "m.so"
    onnx.save(_masked_model(), path)
    capsys.readouterr()
    assert main(["compile", str(path), "--target", "avx2", "-o", str(lib), "--shape", "x=1..4,1..64,32",
                 "--shape", "m=1..4,1..32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'n'" in err and "1..32" in err and len(err.splitlines()) == 1
    assert not lib.exists()
