"""The chunked causal form of linear attention (and MALA, which shares the core) exported with a dynamic length:
chunked = prefix = recurrent (loop, chunk 1) to 1e-5 in fp32 at lengths that are not multiples of the chunk, in
eager torch, in the torch.export program at two lengths and in onnxruntime at two lengths from one export; and the
exported graph's largest intermediate grows as N·C, not as the prefix form's N·F·E."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from passes.attention.linear import linear_attention
from passes.attention.mala import mala_attention

ort = pytest.importorskip("onnxruntime")

CHUNK = 8
FNS = {"linear": linear_attention, "mala": mala_attention}


class _Causal(torch.nn.Module):
    def __init__(self, fn, form: str, window: int = 0):
        super().__init__()
        self.fn, self.form, self.window = fn, form, window

    def forward(self, q, k, v):
        kw = {"window": self.window} if self.window else {}
        return self.fn(q, k, v, scale=0.35, causal=True, causal_form=self.form, chunk_size=CHUNK, **kw)


class _SelfCausal(torch.nn.Module):
    """Self-attention as in a model: q, k, v cut from one input, so they share one symbolic length under export
    (the path without the S + T offset axis; ``auto`` is the chunked form there)."""

    def __init__(self, fn, form: str, window: int = 0):
        super().__init__()
        self.fn, self.form, self.window = fn, form, window

    def forward(self, x):
        q, k, v = x.chunk(3, dim=-1)
        kw = {"window": self.window} if self.window else {}
        return self.fn(q, k, v, scale=0.35, causal=True, causal_form=self.form, chunk_size=CHUNK, **kw)


def _qkv(n: int, seed: int, t: int | None = None, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    t = n if t is None else t
    return (torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, t, d, generator=g),
            torch.randn(1, 2, t, d, generator=g))


def _recurrent(fn, q, k, v):
    """The RNN form: chunk 1 loop (one token at a time with a running state), fp64 for a tight reference."""
    return fn(q.double(), k.double(), v.double(), scale=0.35, causal=True, causal_form="loop", chunk_size=1).float()


def _err(a: torch.Tensor | np.ndarray, b: torch.Tensor) -> float:
    a = torch.as_tensor(a)
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("name", sorted(FNS))
@pytest.mark.parametrize("n", [13, 37, 70])
def test_eager_forms_agree(name, n):
    fn = FNS[name]
    q, k, v = _qkv(n, 0)
    ref = _recurrent(fn, q, k, v)
    for form in ("chunked", "prefix", "loop", "auto"):
        got = fn(q, k, v, scale=0.35, causal=True, causal_form=form, chunk_size=CHUNK)
        assert _err(got, ref) <= 1e-5, f"{name} {form} n={n}"


def _export(m, args, same=True):
    s_dim = torch.export.Dim("S", min=2, max=8192)
    t_dim = s_dim if same else torch.export.Dim("T", min=2, max=8192)
    ds = {"q": {2: s_dim}, "k": {2: t_dim}, "v": {2: t_dim}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        ep = torch.export.export(m, args, dynamic_shapes=ds)
        onx = torch.onnx.export(m, args, dynamic_shapes=ds, dynamo=True, opset_version=18, verbose=False)
    return ep, onx


@pytest.mark.parametrize("name,window", [("linear", 0), ("mala", 0), ("linear", 3)])
def test_exported_chunked_matches_recurrent_at_two_lengths(name, window, tmp_path):
    fn = FNS[name]
    m = _Causal(fn, "chunked", window)
    ep, onx = _export(m, _qkv(12, 0))
    path = tmp_path / "m.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (21, 45):  # neither a multiple of the chunk, neither the example length
        q, k, v = _qkv(n, n)
        ref = (_recurrent(fn, q, k, v) if not window else
               fn(q.double(), k.double(), v.double(), scale=0.35, causal=True, causal_form="prefix",
                  window=window).float())
        prefix = fn(q, k, v, scale=0.35, causal=True, causal_form="prefix", chunk_size=CHUNK,
                    **({"window": window} if window else {}))
        assert _err(prefix, ref) <= 1e-5
        assert _err(ep.module()(q, k, v), ref) <= 1e-5, f"FX n={n}"
        got = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), (q, k, v))})[0]
        assert got.shape == tuple(ref.shape)
        assert _err(got, ref) <= 1e-5, f"onnxruntime n={n}"


def test_exported_distinct_lengths_bottom_right(tmp_path):
    """Distinct dynamic S and T (S < T: the queries are the last S positions) in the exported chunked graph."""
    m = _Causal(linear_attention, "chunked")
    ep, onx = _export(m, _qkv(12, 0, t=15), same=False)
    path = tmp_path / "m.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for s_len, t_len in ((5, 29), (19, 43)):
        q, k, v = _qkv(s_len, 3, t=t_len)
        # naive bottom-right reference: the full causal output over T positions with queries placed at the end
        q_full = torch.cat([torch.zeros(1, 2, t_len - s_len, 8), q], dim=2)
        ref = _recurrent(linear_attention, q_full, k, v)[:, :, t_len - s_len:]
        assert _err(ep.module()(q, k, v), ref) <= 1e-5
        got = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), (q, k, v))})[0]
        assert _err(got, ref) <= 1e-5


def _export_self(m, d: int = 8):
    dyn = {"x": {2: torch.export.Dim("S", min=2, max=8192)}}
    x = torch.randn(1, 2, 12, 3 * d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        ep = torch.export.export(m, (x,), dynamic_shapes=dyn)
        onx = torch.onnx.export(m, (x,), dynamic_shapes=dyn, dynamo=True, opset_version=18, verbose=False)
    return ep, onx


@pytest.mark.parametrize("name", sorted(FNS))
@pytest.mark.parametrize("form", ["chunked"])
def test_exported_self_attention_chunked(name, form, tmp_path):
    """One symbolic length (self-attention): the chunked form on N rows, not S + T, no
    prefix-sized tensor, = recurrent in the FX program and onnxruntime at lengths that are not chunk multiples,
    below one chunk, and exactly one chunk."""
    fn = FNS[name]
    ep, onx = _export_self(_SelfCausal(fn, form))
    path = tmp_path / "m.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (3, 8, 21, 45):
        x = torch.randn(1, 2, n, 24, generator=torch.Generator().manual_seed(n))
        ref = _recurrent(fn, *x.chunk(3, dim=-1))
        assert _err(ep.module()(x), ref) <= 1e-5, f"FX n={n}"
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == tuple(ref.shape)
        assert _err(got, ref) <= 1e-5, f"onnxruntime n={n}"
    # at d = 32: N rows (not S + T = 2N) plus two chunks; the largest tensors are the input (B·H·N·3d), the N·C-type
    # chunk tensors and the (N/C + 2)·F·(E+1) chunk states; the prefix form holds B·H·N·F·(E+1) elements
    d, n = 32, 4096
    ep32, _ = _export_self(_SelfCausal(fn, form), d=d)
    rows = n + 2 * CHUNK
    big = _largest_intermediate(ep32, n)
    assert big <= 2 * max(rows * 3 * d, (rows // CHUNK) * (d + 1) * (d + 2)), big
    assert big * 4 < 2 * n * d * (d + 1)  # C = 8 here: the chunk states are 1/C of the prefix tensor


@pytest.mark.parametrize("name,window", [("linear", 0), ("mala", 0), ("linear", 3)])
def test_tvm_compiles_default_chunked_with_symbolic_batch_and_length(name, window, tmp_path):
    """The default (``auto``) causal form exported with batch and length symbolic (the chunked one when traced:
    test_exported_memory_does_not_grow_as_n_f_e) and one TVM build of it (every dim symbolic, as ``softswap compile`` leaves a converted model) serves several batches and
    lengths that are not chunk multiples: TVM = onnxruntime = eager prefix = recurrent to 1e-5 (fp32); with the
    hybrid window (w = 3) against the fp64 eager prefix form."""
    pytest.importorskip("tvm")
    from targets import Runner, compile_model

    fn = FNS[name]
    m = _SelfCausal(fn, "auto", window)
    kw = {"window": window} if window else {}
    dyn = {"x": {0: torch.export.Dim("B", min=1, max=64), 2: torch.export.Dim("S", min=2, max=8192)}}
    x0 = torch.randn(2, 2, 12, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        onx = torch.onnx.export(m, (x0,), dynamic_shapes=dyn, dynamo=True, opset_version=18, verbose=False)
    onx.save(str(tmp_path / "m.onnx"))
    compile_model(str(tmp_path / "m.onnx"), "host", tmp_path / "m.so", shapes=None)
    runner = Runner(tmp_path / "m.so")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for b, n in ((1, 21), (3, 45), (2, 5)):
        x = torch.randn(b, 2, n, 24, generator=torch.Generator().manual_seed(n))
        q, k, v = x.chunk(3, dim=-1)
        ref = _recurrent(fn, q, k, v) if not window else fn(
            q.double(), k.double(), v.double(), scale=0.35, causal=True, causal_form="prefix", **kw).float()
        prefix = fn(q, k, v, scale=0.35, causal=True, causal_form="prefix", chunk_size=CHUNK, **kw)
        assert _err(prefix, ref) <= 1e-5
        got = list(runner.run({runner.input_names[0]: x.numpy()}).values())[0]
        assert got.shape == tuple(ref.shape)
        assert _err(got, ref) <= 1e-5, f"TVM b={b} n={n}"
        assert _err(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref) <= 1e-5, f"ORT b={b} n={n}"


def _largest_intermediate(ep, n: int) -> int:
    """Elements of the largest tensor in the exported FX graph, its symbolic sizes evaluated at length n."""
    best = 0
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        numel = 1
        for d in val.shape:
            if isinstance(d, int):
                numel *= d
            else:
                expr = d.node.expr
                numel *= int(expr.subs({s: n for s in expr.free_symbols}))
        best = max(best, numel)
    return best


@pytest.mark.parametrize("form,grows_as_nfe", [("chunked", False), ("auto", False), ("prefix", True)])
def test_exported_memory_does_not_grow_as_n_f_e(form, grows_as_nfe):
    """The prefix form holds a (B,H,N,F,E+1) tensor; the chunked one (also the default, ``auto``, when traced)
    N·C- and N/C·F·E-sized ones."""
    d = 32
    m = _Causal(linear_attention, form)
    ep = torch.export.export(m, _qkv(12, 0, d=d), dynamic_shapes={"q": {2: torch.export.Dim("S", min=2, max=8192)},
                                                                  "k": {2: torch.export.Dim("S", min=2, max=8192)},
                                                                  "v": {2: torch.export.Dim("S", min=2, max=8192)}})
    n = 4096
    nfe = 2 * n * d * (d + 1)  # B·H·N·F·(E+1)
    big = _largest_intermediate(ep, n)
    if grows_as_nfe:
        assert big >= nfe
    else:
        # the traced offset axis has S + T = 2N rows plus up to four padding chunks (one per part of the axis and
        # one more); the largest tensors are the N·C-type chunk tensors (≤ B·H·L·max(C, F, E+1)) and the per-chunk
        # states (≤ B·H·(L/C + 1)·F·(E+1))
        rows = 2 * n + 4 * CHUNK
        assert big <= 2 * max(rows * max(CHUNK, d + 1), (rows // CHUNK + 1) * d * (d + 1)), big
        assert big * 3 < nfe


@pytest.mark.parametrize("name,window", [("linear", 3), ("mala", 3), ("linear", 30)])
def test_exported_self_attention_hybrid_matches_eager(name, window, tmp_path):
    """The hybrid window on one shared length symbol (the form a model's prefill exports: the rest keys read by
    shifted gathers, no offset axis): FX and onnxruntime at N = 21 and 45 (window 30: N below and above it) equal
    the eager prefix form in fp64 to 1e-5."""
    fn = FNS[name]
    m = _SelfCausal(fn, "chunked", window)
    x0 = torch.cat(_qkv(12, 0), dim=-1)
    dim = torch.export.Dim("N", min=2, max=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        ep = torch.export.export(m, (x0,), dynamic_shapes={"x": {2: dim}})
        onx = torch.onnx.export(m, (x0,), dynamic_shapes={"x": {2: dim}}, dynamo=True, opset_version=18,
                                verbose=False)
    onx.save(str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (21, 45):
        q, k, v = _qkv(n, n)
        ref = fn(q.double(), k.double(), v.double(), scale=0.35, causal=True, causal_form="prefix",
                 window=window).float()
        x = torch.cat([q, k, v], dim=-1)
        assert _err(ep.module()(x), ref) <= 1e-5, f"FX n={n}"
        assert _err(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], ref) <= 1e-5, f"onnxruntime n={n}"
