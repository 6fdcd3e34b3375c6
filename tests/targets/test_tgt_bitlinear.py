"""1-bit linears: the XNOR/popcount kernels are exact against a float64 ±1 matmul, and the CPU pipeline routes the
contract's binary-linear pattern (ONNX and torch.export imports) to them, matching onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from targets.artifact import build
from targets.bitlinear import (choose_bit_kernel, make_bgemm_kernel, make_pack_kernel, pack_signs_np, pack_weights,
                               padded_outputs, words_of)
from targets.importer import import_exported_program, import_onnx
from targets.pipeline import loop_report, scheduled_module
from targets.softmax_kernels import vector_bits_of
from targets.table import get_target

from tgt_models import exec_targets, ort_run


def _signs(x: np.ndarray) -> np.ndarray:
    """The contract's sign: +1 where x >= 0 (0 and -0.0 included), -1 elsewhere (NaN included)."""
    return np.where(x >= 0, 1.0, -1.0)


def _pm1(rng, shape) -> np.ndarray:
    return np.where(rng.random(shape) < 0.5, 1.0, -1.0).astype(np.float32)


def _activations(rng, shape) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[:4] = [0.0, -0.0, np.nan, -1e-30][: flat.size]
    return x


def _compile_kernels(m, k, n, target):
    tgt = get_target(target)
    bits = vector_bits_of(tgt)
    ch = choose_bit_kernel(m, n, bits)
    mod = tvm.IRModule({"pack": make_pack_kernel(m, k, bits).with_attr("global_symbol", "pack"),
                        "bgemm": make_bgemm_kernel(m, k, n, ch).with_attr("global_symbol", "bgemm")})
    return tvm.compile(mod, target=tgt), ch


# --- packing -----------------------------------------------------------------------------------------------------


def test_pack_signs_bit_layout():
    """Bit j of word k is input 64k + j, set where not x >= 0; padding bits are 0 (independent integer sum)."""
    rng = np.random.default_rng(1)
    x = _activations(rng, (3, 130))
    words = pack_signs_np(x)
    assert words.shape == (3, 3) and words.dtype == np.uint64
    for r in range(3):
        for k in range(3):
            expect = sum(1 << j for j in range(64) if 64 * k + j < 130 and not x[r, 64 * k + j] >= 0)
            assert int(words[r, k]) == expect
    assert int(words[0, 0]) & 0b1111 == 0b1100  # 0 -> +1, -0.0 -> +1, NaN -> -1, -1e-30 -> -1


def test_pack_weights_panels():
    rng = np.random.default_rng(2)
    w = _pm1(rng, (70, 13))  # (in, out)
    panels = pack_weights(w, 8)
    assert panels.shape == (2, 2, 8)
    cols = pack_signs_np(w.T)
    for c in range(16):
        expect = cols[c] if c < 13 else np.zeros(2, np.uint64)
        np.testing.assert_array_equal(panels[c // 8, :, c % 8], expect)


# --- kernels -----------------------------------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (5, 70, 5), (4, 64, 64), (13, 130, 37), (33, 200, 100), (197, 768, 96)]


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernels_exact(target, m, k, n):
    """pack + bgemm == float64 sign(x) @ W exactly, including inputs that do not fill the last word and outputs
    that do not fill the last panel."""
    rng = np.random.default_rng(m * 1000 + k + n)
    lib, ch = _compile_kernels(m, k, n, target)
    x = _activations(rng, (m, k))
    w = _pm1(rng, (k, n))
    xp = tvm.runtime.tensor(np.zeros((m, words_of(k)), np.uint64))
    y = tvm.runtime.tensor(np.full((m, padded_outputs(n, ch)), np.nan, np.float32))
    lib["pack"](tvm.runtime.tensor(x), xp)
    np.testing.assert_array_equal(xp.numpy(), pack_signs_np(x))
    lib["bgemm"](xp, tvm.runtime.tensor(pack_weights(w, ch.panel)), y)
    ref = _signs(x).astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_array_equal(y.numpy()[:, :n], ref.astype(np.float32))


@pytest.mark.parametrize("name,popcnt", [("avx512-amd", True), ("avx512-intel", False), ("avx2", False)])
def test_popcount_instructions_compile_only(name, popcnt):
    """LLVM emits ``vpopcntq`` only for targets with AVX512-VPOPCNTDQ (Zen 4), and the nibble-table ``vpshufb``
    sequence elsewhere. Compile-only: nothing is executed."""
    lib, _ = _compile_kernels(13, 130, 37, name)
    asm = lib.mod.inspect_source("asm")
    assert ("vpopcntq" in asm) is popcnt
    if not popcnt:
        assert "vpshufb" in asm and "vpsadbw" in asm


def test_rejects_inexact_sizes():
    with pytest.raises(ValueError, match="not exact"):
        make_bgemm_kernel(1, 1 << 24, 8, choose_bit_kernel(1, 8, 512))
    with pytest.raises(ValueError, match="non-empty"):
        make_bgemm_kernel(0, 8, 8, choose_bit_kernel(1, 8, 512))


# --- the pattern pass ----------------------------------------------------------------------------------------------


def _binary_onnx(w_in_out: np.ndarray, alpha: np.ndarray, bias: np.ndarray | None, x_shape, layers: int = 1,
                 w2: np.ndarray | None = None) -> onnx.ModelProto:
    """The contract's frozen binary linear(s) in ONNX: GreaterOrEqual -> Where(1, -1) -> MatMul(W±1) -> Mul(α) ->
    Add(b); ``layers=2`` chains a second one (weight ``w2``) on the first's output."""
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(-1.0, np.float32), "minus_one")]
    nodes = []
    cur = "x"
    weights = [w_in_out] + ([w2] if layers == 2 else [])
    for i, w in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(alpha[: w.shape[1]], f"alpha{i}")]
        nodes += [helper.make_node("GreaterOrEqual", [cur, "zero"], [f"c{i}"]),
                  helper.make_node("Where", [f"c{i}", "one", "minus_one"], [f"s{i}"]),
                  helper.make_node("MatMul", [f"s{i}", f"w{i}"], [f"mm{i}"]),
                  helper.make_node("Mul", [f"mm{i}", f"alpha{i}"], [f"y{i}"])]
        cur = f"y{i}"
        if bias is not None:
            inits.append(numpy_helper.from_array(bias[: w.shape[1]], f"bias{i}"))
            nodes.append(helper.make_node("Add", [cur, f"bias{i}"], [f"z{i}"]))
            cur = f"z{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    out_shape = list(x_shape[:-1]) + [weights[-1].shape[1]]
    g = helper.make_graph(nodes, "binary_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _routed(mod, target) -> tuple[list[str], list[str]]:
    """(names of the routed product kernels, names of every function) of the scheduled module; every bit-packed
    kernel is a parallel loop nest with vector code (explicit vectors: the pack kernel has no vectorized loop)."""
    sched = scheduled_module(mod, get_target(target))
    report = loop_report(sched)
    names = [gv.name_hint for gv, _ in sched.functions_items()]
    for gv, f in sched.functions_items():
        if gv.name_hint.startswith("bitlinear_"):
            assert report[gv.name_hint]["parallel"], gv.name_hint
            assert report[gv.name_hint]["vectorized"] or "T.Ramp(" in f.script(), gv.name_hint
    return sorted(n for n in names if n.startswith("bitlinear_gemm")), names


def _run(imported, target, x):
    vm = relax.VirtualMachine(build(imported, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


@pytest.mark.parametrize("target", exec_targets())
def test_onnx_binary_linear_routed_and_matches_ort(target):
    rng = np.random.default_rng(3)
    w, alpha, bias = _pm1(rng, (130, 37)), rng.random(37).astype(np.float32), rng.standard_normal(37).astype(
        np.float32)
    proto = _binary_onnx(w, alpha, bias, [2, 5, 130])
    x = _activations(rng, (2, 5, 130))
    imported = import_onnx(proto)
    gemms, names = _routed(imported.mod, target)
    assert gemms == ["bitlinear_gemm_10x130x37"], names
    assert not any("matmul" in n for n in names), names
    out = _run(imported, target, x)
    np.testing.assert_allclose(out, ort_run(proto, {"x": x})[0], rtol=1e-6, atol=1e-5)
    ref = (_signs(x).astype(np.float64) @ w.astype(np.float64)) * alpha + bias
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-5)


def test_onnx_two_chained_binary_linears():
    """The second layer's sign reads the first's (rewritten) output: both are routed and the result is exact up
    to the float α / bias ops (against onnxruntime)."""
    rng = np.random.default_rng(4)
    w1, w2 = _pm1(rng, (96, 64)), _pm1(rng, (64, 10))
    alpha = rng.random(64).astype(np.float32)
    proto = _binary_onnx(w1, alpha, rng.standard_normal(64).astype(np.float32), [7, 96], layers=2, w2=w2)
    imported = import_onnx(proto)
    gemms, _ = _routed(imported.mod, "host")
    assert gemms == ["bitlinear_gemm_7x64x10", "bitlinear_gemm_7x96x64"]
    x = rng.standard_normal((7, 96)).astype(np.float32)
    np.testing.assert_allclose(_run(imported, "host", x), ort_run(proto, {"x": x})[0], rtol=1e-6, atol=1e-5)


def test_onnx_half_weight_is_left_alone(caplog):
    """One weight entry of 0.5: not a binary linear; TVM's matmul stays, the reason is logged, numbers match ORT."""
    rng = np.random.default_rng(5)
    w = _pm1(rng, (70, 12))
    w[3, 4] = 0.5
    proto = _binary_onnx(w, rng.random(12).astype(np.float32), None, [6, 70])
    imported = import_onnx(proto)
    with caplog.at_level(logging.DEBUG, logger="targets.bitlinear_route"):
        gemms, names = _routed(imported.mod, "host")
    assert gemms == [] and any("matmul" in n for n in names), names
    assert "entries other than ±1" in caplog.text and "0.5 at [3, 4]" in caplog.text
    x = rng.standard_normal((6, 70)).astype(np.float32)
    np.testing.assert_allclose(_run(imported, "host", x), ort_run(proto, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_onnx_symbolic_batch_routed():
    """A dynamic batch: the kernels take the row count at run time; two batch sizes match onnxruntime."""
    rng = np.random.default_rng(6)
    proto = _binary_onnx(_pm1(rng, (130, 37)), rng.random(37).astype(np.float32),
                         rng.standard_normal(37).astype(np.float32), ["batch", 3, 130])
    imported = import_onnx(proto)
    gemms, _ = _routed(imported.mod, "host")
    assert gemms == ["bitlinear_gemm_dynx130x37"]
    vm = relax.VirtualMachine(build(imported, "host"), tvm.cpu())
    for batch in (1, 7):
        x = _activations(rng, (batch, 3, 130))
        out = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(out, ort_run(proto, {"x": x})[0], rtol=1e-6, atol=1e-5)


def test_onnx_symbolic_features_left_alone(caplog):
    rng = np.random.default_rng(8)
    proto = _binary_onnx(_pm1(rng, (64, 8)), rng.random(8).astype(np.float32), None, [4, "features"])
    imported = import_onnx(proto)
    with caplog.at_level(logging.DEBUG, logger="targets.bitlinear_route"):
        gemms, _ = _routed(imported.mod, "host")
    assert gemms == [] and "the features must be static" in caplog.text, caplog.text


class _TorchBinaryLinear(torch.nn.Module):
    """The contract's torch form: torch.where(x >= 0, 1, -1) -> linear(W±1 (out, in)) -> * α -> + b."""

    def __init__(self, w_out_in: np.ndarray, alpha: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.register_buffer("w", torch.tensor(w_out_in))
        self.register_buffer("alpha", torch.tensor(alpha))
        self.register_buffer("bias", torch.tensor(bias))

    def forward(self, x):
        s = torch.where(x >= 0, 1.0, -1.0)
        return torch.nn.functional.linear(s, self.w) * self.alpha + self.bias


@pytest.mark.parametrize("half", [False, True])
def test_torch_export_binary_linear(half):
    rng = np.random.default_rng(7)
    w = _pm1(rng, (40, 100))  # (out, in)
    if half:
        w[0, 0] = 0.5
    model = _TorchBinaryLinear(w, rng.random(40).astype(np.float32), rng.standard_normal(40).astype(np.float32))
    x = _activations(rng, (2, 9, 100))
    ep = torch.export.export(model.eval(), (torch.from_numpy(x),))
    imported = import_exported_program(ep)
    gemms, _ = _routed(imported.mod, "host")
    assert gemms == ([] if half else ["bitlinear_gemm_18x100x40"])
    out = _run(imported, "host", x)
    with torch.no_grad():
        np.testing.assert_allclose(out, model(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-5)


class _SabBlock(torch.nn.Module):
    """BiViT's softmax-aware binarisation as exported (``P >= r * amax(P)``), plus an all-axes ``amax``: TVM's torch
    frontend has no ``aten.amax``; the importer's normalization spells it as ``max.dim`` reductions."""

    def forward(self, p):
        sab = (p >= p.amax(dim=-1, keepdim=True) * 0.5).to(p.dtype)
        return sab * p.amax(dim=(0, 2)).unsqueeze(-1) + torch.amax(p)


def test_torch_amax_imports_and_matches():
    p = torch.softmax(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    ep = torch.export.export(_SabBlock().eval(), (p,))
    assert any("amax" in str(n.target) for n in ep.graph.nodes)
    out = _run(import_exported_program(ep), "host", p.numpy())
    with torch.no_grad():
        ref = _SabBlock()(p).numpy()
    np.testing.assert_array_equal(out, ref)


def test_artifact_round_trip(tmp_path, caplog):
    """``compile_model`` exports the packed uint64 weights inside the library; the Runner's output matches ORT."""
    from targets.artifact import compile_model
    from targets.runner import Runner

    rng = np.random.default_rng(9)
    proto = _binary_onnx(_pm1(rng, (100, 20)), rng.random(20).astype(np.float32),
                         rng.standard_normal(20).astype(np.float32), ["batch", 100])
    lib = tmp_path / "bin.so"
    with caplog.at_level(logging.INFO, logger="targets.bitlinear_route"):
        compile_model(proto, "host", lib)
    assert "routed 1 binary linear(s)" in caplog.text
    x = _activations(rng, (3, 100))
    out = Runner(lib).run({"x": x})
    np.testing.assert_allclose(out["y"], ort_run(proto, {"x": x})[0], rtol=1e-6, atol=1e-5)
