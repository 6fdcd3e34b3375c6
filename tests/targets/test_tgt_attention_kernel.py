"""The fused softmax attention kernel (targets.attention_kernel) against a float64 numpy reference, and its Relax
pattern (targets.attention_route): it fires on the zoo BERT ONNX and on the torch frontend's graph, the compiled
model matches onnxruntime / torch, fully masked rows behave like the unfused path; the run-time-shaped kernel
serves symbolic batch and length from one build."""
from __future__ import annotations

import numpy as np
import pytest

from tgt_models import exec_targets


def _lanes(target: str) -> int:
    from targets.softmax_kernels import vector_bits_of
    from targets.table import get_target

    return 16 if vector_bits_of(get_target(target)) >= 512 else 8


def _reference(q, k, v, scale, mask):
    """float64 softmax(q kᵀ scale + mask) v; rows whose every logit is masked (all exps 0 after the max shift,
    or -inf everywhere) are uniform, as the project's softmax kernels define them."""
    s = np.einsum("bnd,bmd->bnm", q.astype(np.float64), k.astype(np.float64)) * scale
    if mask is not None:
        s = s + mask.astype(np.float64)
    out = np.empty((q.shape[0], q.shape[1], v.shape[2]))
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            row = s[b, i]
            if not np.isfinite(row.max()) or row.max() < -1e30:
                p = np.full(row.shape, 1.0 / row.size)
            else:
                p = np.exp(row - row.max())
                p /= p.sum()
            out[b, i] = p @ v[b].astype(np.float64)
    return out


def _run_kernel(target, q, k, v, scale, mask, mask_layout):
    import tvm

    from targets.attention_kernel import AttentionShape, build_attention_library
    from targets.table import get_target

    bh, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    shape = AttentionShape(bh, n, m, d, dv, _lanes(target), scale, mask_layout)
    lib = build_attention_library(shape, get_target(target))
    out = tvm.runtime.tensor(np.zeros((bh, n, dv), np.float32))
    args = [q, np.ascontiguousarray(k.transpose(0, 2, 1)), v] + ([mask.reshape(-1)] if mask is not None else [])
    lib["attention"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


CASES = {
    # name: (bh, n, m, d, dv, scale, mask kind)
    "plain_100": (2, 100, 100, 64, 64, 0.125, None),
    "padding_mask_3_blocks": (4, 37, 600, 64, 64, 0.125, "padding"),  # 2 full key blocks + a 88-key tail
    "causal_inf_odd": (2, 77, 77, 32, 24, 1.0, "causal_inf"),  # N not a multiple of the 6-row tile or the block
    "causal_finfo_min": (2, 50, 300, 16, 8, 0.25, "causal_min"),
    "single": (1, 1, 1, 64, 64, 0.125, None),
    # 4 query blocks (the last one 6 rows: trimmed), 3 key blocks (the last 188 keys: 2 packed tiles + 60 scalar
    # keys), the causal mask read per 6-row strip
    "causal_blocks_strips": (2, 150, 700, 64, 64, 0.125, "causal_inf"),
    "fully_masked_rows": (2, 30, 40, 64, 64, 0.125, "rows"),
}


def _mask(kind, bh, n, m, rng):
    """(mask broadcast to (bh, n, m) for the reference, mask as the kernel reads it, MaskLayout)."""
    from targets.attention_kernel import MaskLayout

    if kind is None:
        return None, None, None
    if kind == "padding":  # (B, 1, 1, M) with B = 2, H = bh / 2: keys masked per batch with -inf
        keep = rng.random((2, 1, 1, m)) > 0.3
        small = np.where(keep, 0.0, -np.inf).astype(np.float32)
        full = np.broadcast_to(small, (2, bh // 2, n, m)).reshape(bh, n, m)
        return full, small, MaskLayout((2, bh // 2), (m, 0), 0, 1, 2 * m)
    if kind in ("causal_inf", "causal_min"):
        fill = -np.inf if kind == "causal_inf" else np.finfo(np.float32).min
        small = np.triu(np.full((n, m), fill, np.float32), 1)
        return np.broadcast_to(small, (bh, n, m)), small, MaskLayout((bh,), (0,), m, 1, n * m)
    if kind == "rows":  # a random additive mask, rows 3 and 7 fully -inf, row 11 fully finfo.min, per head
        small = rng.standard_normal((bh, n, m)).astype(np.float32)
        small[:, 3] = -np.inf
        small[:, 7] = -np.inf
        small[:, 11] = np.finfo(np.float32).min
        return small, small, MaskLayout((bh,), (n * m,), m, 1, bh * n * m)
    raise AssertionError(kind)


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("case", list(CASES))
def test_fused_kernel_matches_float64_reference(case, target, rng):
    bh, n, m, d, dv, scale, kind = CASES[case]
    q, k = (rng.standard_normal((bh, x, d)).astype(np.float32) for x in (n, m))
    v = rng.standard_normal((bh, m, dv)).astype(np.float32)
    full, small, layout = _mask(kind, bh, n, m, rng)
    got = _run_kernel(target, q, k, v, scale, small, layout)
    want = _reference(q, k, v, scale, full)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * max(1.0, np.abs(want).max()))


def _sdpa_block():
    """An nn.Module that is one ``scaled_dot_product_attention(q, k, v, attn_mask=m)`` (the exporters' SDPA)."""
    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def forward(self, q, k, v, m=None):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    return Block()


def _sdpa_onnx(n: int, masked: bool):
    import torch

    from rewrite.io import quiet_stdout

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(1, 4, n, 32, generator=g) for _ in range(3)]
    if masked:
        mask = torch.randn(1, 1, n, n, generator=g)
        mask[..., 2, :] = float("-inf")  # a fully masked query row
        mask[..., 5, :] = torch.finfo(torch.float32).min  # and one at the most negative float
        args.append(mask)
    names = ["q", "k", "v", "m"][: len(args)]
    with quiet_stdout():
        proto = torch.onnx.export(_sdpa_block().eval(), tuple(args), dynamo=True, input_names=names, verbose=False)
    return proto.model_proto, {nm: a.numpy() for nm, a in zip(names, args)}


def _compile_run(imported, target: str, feeds: dict, fused: bool):
    import tvm
    from tvm import relax

    from targets.pipeline import cpu_pipeline
    from targets.table import get_target

    tgt = get_target(target)
    ex = tvm.compile(imported.mod, target=tgt, relax_pipeline=cpu_pipeline(tgt, route_attention=fused))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[i["name"]]) for i in imported.inputs])
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def _fused_functions(mod, target: str) -> list[str]:
    from targets.pipeline import scheduled_module
    from targets.table import get_target

    return [gv.name_hint for gv, _ in scheduled_module(mod, get_target(target)).functions_items()
            if gv.name_hint.startswith("attention_fused")]


@pytest.mark.parametrize("target", exec_targets())
def test_fully_masked_rows_like_unfused_path(target):
    """Rows masked with -inf or finfo.min everywhere: the fused kernel gives what the unfused TVM path gives (the
    uniform distribution, i.e. the mean of V), never NaN; the other rows match the unfused path closely."""
    from targets.importer import import_model

    proto, feeds = _sdpa_onnx(70, masked=True)
    imported = import_model(proto)
    assert _fused_functions(imported.mod, target)
    fused = _compile_run(imported, target, feeds, True)
    unfused = _compile_run(imported, target, feeds, False)
    assert np.isfinite(fused).all()
    mean_v = feeds["v"].mean(axis=2)
    for row in (2, 5):
        np.testing.assert_allclose(fused[:, :, row], mean_v, atol=1e-5)
        np.testing.assert_allclose(unfused[:, :, row], mean_v, atol=1e-5)
    np.testing.assert_allclose(fused, unfused, rtol=0, atol=1e-5)


@pytest.mark.parametrize("target", exec_targets())
def test_pattern_fires_on_zoo_bert_and_matches_onnxruntime(target, zoo_onnx, tmp_path):
    import zoo
    from rewrite.io import load_onnx
    from rewrite.verify import run
    from targets import Runner, compile_model
    from targets.importer import import_model

    _, args, _ = zoo.get("hf_bert_sdpa").build()
    path = zoo_onnx("hf_bert_sdpa", "dynamo")
    loaded = load_onnx(path)
    feeds = {n: a.numpy() for n, a in zip(loaded.input_names, args)}
    shapes = {n: list(a.shape) for n, a in feeds.items()}
    assert _fused_functions(import_model(str(path), shapes=shapes).mod, target)  # both layers, one kernel
    expected = list(run(loaded, feeds).values())
    compile_model(str(path), target, tmp_path / "bert.so", shapes=shapes)
    got = list(Runner(tmp_path / "bert.so").run(feeds).values())
    for a, b in zip(expected, got):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())


def test_pattern_fires_on_torch_frontend_graph():
    """The torch frontend wraps batched matmuls in reshape/broadcast_to; the explicit-softmax block with a divide
    and a padding mask still fuses and matches torch."""
    import torch

    from targets.importer import import_model

    class Block(torch.nn.Module):
        def forward(self, q, k, v, m):
            return torch.softmax(q @ k.transpose(-1, -2) / 8.0 + m, -1) @ v

    g = torch.Generator().manual_seed(1)
    args = tuple(torch.randn(2, 4, 40, 64, generator=g) for _ in range(3)) + (torch.randn(2, 1, 1, 40, generator=g),)
    imported = import_model(Block(), example_inputs=args)
    assert _fused_functions(imported.mod, "avx2")
    feeds = {i["name"]: a.numpy() for i, a in zip(imported.inputs, args)}
    got = _compile_run(imported, "avx2", feeds, True)
    np.testing.assert_allclose(got, Block()(*args).numpy(), rtol=0, atol=1e-5)


def _symbolic_module(n, d: int = 64, mask_dims=None):
    """q, k, v (1, 8, n, d) [+ mask of ``mask_dims``] -> softmax(q kᵀ [+ mask]) v, as the ONNX importer emits it."""
    import tvm  # noqa: F401
    from tvm import relax

    bb = relax.BlockBuilder()
    q, k, v = (relax.Var(x, relax.TensorType((1, 8, n, d), "float32")) for x in "qkv")
    params = [q, k, v] + ([relax.Var("m", relax.TensorType(mask_dims, "float32"))] if mask_dims else [])
    with bb.function("main", params):
        with bb.dataflow():
            kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
            s = bb.emit(relax.op.matmul(q, kt))
            if mask_dims:
                s = bb.emit(relax.op.add(s, params[3]))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            o = bb.emit_output(relax.op.matmul(p, v))
        bb.emit_func_output(o)
    return bb.get()


def test_symbolic_length_fuses_unless_head_dim_symbolic():
    """A symbolic sequence length (and a mask broadcast over it) takes the run-time-shaped kernel; the same graph
    with a static length takes the static one; a symbolic head dim, or a mask whose leading dim is an unrelated
    symbol, keeps the unfused matmul -> softmax -> matmul chain."""
    import tvm

    from targets.attention_route import RouteAttention
    from targets.table import get_target

    tgt = get_target("avx2")
    n = tvm.tirx.Var("n", "int64")
    sym = RouteAttention(tgt)(_symbolic_module(n, mask_dims=(1, 1, 1, n)))["main"].script()
    assert "R.nn.softmax" not in sym and "attention_fused_symbolic" in sym
    static = RouteAttention(tgt)(_symbolic_module(96))["main"].script()
    assert "R.nn.softmax" not in static and "attention_fused_8x96x96" in static
    for mod in (_symbolic_module(n, d=tvm.tirx.Var("d", "int64")),
                _symbolic_module(n, mask_dims=(tvm.tirx.Var("b", "int64"), 1, 1, n))):
        text = RouteAttention(tgt)(mod)["main"].script()
        assert "R.nn.softmax" in text and "attention_fused" not in text


#: lengths of the one-artefact checks: below a register tile, odd, past one 256-key block, past one and a half
SYMBOLIC_LENGTHS = (1, 7, 49, 130, 300)


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("kind", ["padding", "full", "none"])
def test_symbolic_kernel_matches_float64_reference(kind, target, rng):
    """ONE compiled run-time-shaped kernel per mask layout serves batch 1 and 3 at every length in
    SYMBOLIC_LENGTHS (not multiples of the 6-row tile, the 48-row query block or the 256-key block):
    ``padding`` a (B, 1, 1, N) -inf mask that masks the whole first key block of one sequence, ``full`` a
    (B, 1, N, N) mask with one fully masked row (uniform, as the unfused path), ``none`` M = N + 5 keys."""
    import tvm

    from targets.attention_kernel import SymbolicAttention, SymbolicMask, build_attention_library
    from targets.table import get_target

    heads, d, dv = 2, 16, 8 if kind == "none" else 16
    smask = {"padding": SymbolicMask(((heads, None, 1),), False, True),
             "full": SymbolicMask(((heads, None, 1),), True, True), "none": None}[kind]
    lib = build_attention_library(SymbolicAttention(d, dv, _lanes(target), 0.25, smask), get_target(target))
    for b in (1, 3):
        for n in SYMBOLIC_LENGTHS:
            bh, m = b * heads, n + 5 if kind == "none" else n
            q = rng.standard_normal((bh, n, d)).astype(np.float32)
            k = rng.standard_normal((bh, m, d)).astype(np.float32)
            v = rng.standard_normal((bh, m, dv)).astype(np.float32)
            args, full = [q, k.transpose(0, 2, 1), v], None
            if kind == "padding":
                keep = rng.random((b, 1, m)) > 0.3
                keep[0, :, : min(256, m - 1)] = False  # the whole first key block when m > 256
                keep[:, :, -1] = True
                small = np.where(keep, 0.0, -np.inf).astype(np.float32)
                full = np.broadcast_to(small[:, None], (b, heads, n, m)).reshape(bh, n, m)
                args.append(small)
            elif kind == "full":
                small = rng.standard_normal((b, n, m)).astype(np.float32)
                small[-1, n // 2, :] = -np.inf
                full = np.broadcast_to(small[:, None], (b, heads, n, m)).reshape(bh, n, m)
                args.append(small)
            out = tvm.runtime.tensor(np.zeros((bh, n, dv), np.float32))
            lib["attention"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
            want = _reference(q, k, v, 0.25, full)
            got = out.numpy()
            assert np.isfinite(got).all(), (b, n)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()),
                                       err_msg=f"batch {b}, length {n}")


def test_symbolic_bert_one_artefact_matches_onnxruntime(zoo_onnx, tmp_path):
    """The zoo BERT (dynamo export) compiled once with batch and length symbolic fuses both attention blocks into
    the run-time-shaped kernel and matches onnxruntime within 1e-4 at several batches and lengths (padding masks)."""
    from rewrite.io import load_onnx
    from rewrite.verify import run
    from targets import Runner, compile_model
    from targets.importer import import_model

    path = zoo_onnx("hf_bert_sdpa", "dynamo")
    assert any(f.startswith("attention_fused_symbolic") for f in _fused_functions(import_model(str(path)).mod,
                                                                                  "avx2"))
    compile_model(str(path), "avx2", tmp_path / "bert.so", shapes={"input_ids": [(1, 4), (1, 64)]})
    runner, loaded = Runner(tmp_path / "bert.so"), load_onnx(path)
    rng = np.random.default_rng(3)
    for b, n in ((1, 1), (2, 7), (1, 49), (3, 64)):
        mask = np.ones((b, n), np.int64)
        mask[-1, n - n // 3:] = 0
        feeds = {"input_ids": rng.integers(0, 100, (b, n)), "attention_mask": mask,
                 "token_type_ids": np.zeros((b, n), np.int64)}
        feeds = {k: feeds[k] for k in loaded.input_names}
        for want, got in zip(run(loaded, feeds).values(), runner.run(feeds).values()):
            assert np.abs(want - got).max() <= 1e-4 * max(1.0, np.abs(want).max()), (b, n)


@pytest.mark.parametrize("target", exec_targets())
def test_kernel_writes_callers_output_shape(target, rng):
    """``out_lead``: the static and the run-time-shaped kernels write a (2, 2, N, DV) output (the caller's shape, so
    the graph needs no reshape copy after the call) bit-identical to their (BH, N, DV) output."""
    import tvm

    from targets.attention_kernel import AttentionShape, SymbolicAttention, build_attention_library
    from targets.table import get_target

    bh, n, m, d, dv = 4, 37, 70, 16, 16
    q, kt, v = (rng.standard_normal(s).astype(np.float32) for s in ((bh, n, d), (bh, d, m), (bh, m, dv)))
    lanes = _lanes(target)
    outs = {}
    for name, s, oshape in (
            ("static", AttentionShape(bh, n, m, d, dv, lanes, 0.25), (bh, n, dv)),
            ("static_4d", AttentionShape(bh, n, m, d, dv, lanes, 0.25, None, (2, 2)), (2, 2, n, dv)),
            ("symbolic", SymbolicAttention(d, dv, lanes, 0.25), (bh, n, dv)),
            ("symbolic_4d", SymbolicAttention(d, dv, lanes, 0.25, None, (2,)), (2, 2, n, dv))):
        lib = build_attention_library(s, get_target(target))
        out = tvm.runtime.tensor(np.full(oshape, np.nan, np.float32))
        lib["attention"](*[tvm.runtime.tensor(a) for a in (q, kt, v)], out)
        outs[name] = out.numpy().reshape(bh, n, dv)
    np.testing.assert_allclose(outs["static"], _reference(q, kt.transpose(0, 2, 1), v, 0.25, None), rtol=0,
                               atol=2e-6 * max(1.0, np.abs(outs["static"]).max()))
    np.testing.assert_array_equal(outs["static_4d"], outs["static"])
    np.testing.assert_array_equal(outs["symbolic_4d"], outs["symbolic"])


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("m", [70, 300])
def test_kernel_reads_untransposed_keys(m, target, rng):
    """``k_rows``: the static and the run-time-shaped kernels given K as (BH, M, D) rows (transposed while Kᵀ is
    packed; M = 70 / 300 leave keys past the last whole score tile: scalar loop / padded tile) give outputs
    bit-identical to the same kernels given Kᵀ, and match the float64 reference."""
    import tvm

    from targets.attention_kernel import AttentionShape, SymbolicAttention, build_attention_library
    from targets.table import get_target

    bh, n, d, dv = 2, 50, 64, 64
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((bh, n, d), (bh, m, d), (bh, m, dv)))
    lanes = _lanes(target)
    for make in (lambda rows: AttentionShape(bh, n, m, d, dv, lanes, 0.125, None, None, rows),
                 lambda rows: SymbolicAttention(d, dv, lanes, 0.125, None, None, rows)):
        outs = []
        for rows, keys in ((False, np.ascontiguousarray(k.transpose(0, 2, 1))), (True, k)):
            lib = build_attention_library(make(rows), get_target(target))
            out = tvm.runtime.tensor(np.full((bh, n, dv), np.nan, np.float32))
            lib["attention"](*[tvm.runtime.tensor(a) for a in (q, keys, v)], out)
            outs.append(out.numpy())
        np.testing.assert_array_equal(outs[1], outs[0])
        want = _reference(q, k, v, 0.125, None)
        np.testing.assert_allclose(outs[1], want, rtol=0, atol=2e-6 * max(1.0, np.abs(want).max()))


def _sdpa_export(n: int, masked: bool, dynamo: bool):
    """SDPA (B=1, H=4, d=32, [+ a (1, 1, N, N) float mask]) exported by the dynamo or the classic ONNX exporter, and
    its feeds."""
    import io

    import onnx
    import torch

    from rewrite.io import quiet_stdout

    g = torch.Generator().manual_seed(2)
    args = [torch.randn(1, 4, n, 32, generator=g) for _ in range(3)]
    if masked:
        args.append(torch.randn(1, 1, n, n, generator=g))
    names = ["q", "k", "v", "m"][: len(args)]
    with quiet_stdout():
        if dynamo:
            proto = torch.onnx.export(_sdpa_block().eval(), tuple(args), dynamo=True, input_names=names,
                                      verbose=False).model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(_sdpa_block().eval(), tuple(args), buf, dynamo=False, input_names=names, output_names=["o"])
            proto = onnx.load_from_string(buf.getvalue())
    return proto, {nm: a.numpy() for nm, a in zip(names, args)}


@pytest.mark.parametrize("target", exec_targets())
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "classic"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
def test_sdpa_exports_fold_scale_and_write_output_in_place(masked, dynamo, target):
    """Both exporters' SDPA: the route folds the ``sqrt(scale)`` multiplies of Q and K into the kernel's scale, has
    the kernel read K untransposed and write the caller's (1, H, N, d) output, so only reshapes of the inputs (views)
    and the kernel remain; the compiled model matches onnxruntime within 1e-5."""
    from tvm import relax

    from targets.attention_route import RouteAttention
    from targets.importer import import_model
    from targets.table import get_target
    from targets.bench import ort_session

    proto, feeds = _sdpa_export(70, masked, dynamo)
    imported = import_model(proto)
    routed = RouteAttention(get_target(target))(imported.mod)["main"]
    text = routed.script()
    assert "R.multiply" not in text and "R.permute_dims" not in text and "R.nn.softmax" not in text, text
    calls = [b.value for blk in routed.body.blocks for b in blk.bindings
             if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"]
    assert len(calls) == 1 and [int(x) for x in calls[0].ty.shape.values] == [1, 4, 70, 32]
    assert routed.body.body.ty.shape.values[0].value == 1
    got = _compile_run(imported, target, feeds, True)
    want = ort_session(proto, 1).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
