"""1-bit (W1A1) linear layers on CPU: bit-packed XNOR/popcount matrix products in TIR.

A binary linear ``y = sign(x) @ W`` with ``W`` a constant of ±1 entries is an integer product: for one output, with
``a`` the signs of a row of ``x`` and ``w`` a column of ``W`` (``n`` inputs),

    a · w = n - 2 · popcount(bits(a) xor bits(w))

where ``bits(v)`` has bit ``i`` set exactly where ``v[i] = -1``.  Signs are packed 64 to a ``uint64`` word (word ``k``
holds inputs ``64k .. 64k+63``, input ``64k+j`` in bit ``j``); the padding bits of the last word are 0 in both
operands, so they never count.  The result is an integer of magnitude at most ``n`` and is written exactly as
float32 (``n < 2^24``).

Sign convention (the contract's ``where(x >= 0, 1, -1)``): an activation's bit is ``not (x >= 0)``, so 0 and -0.0
give +1 and NaN gives -1, as the float graph does.

Kernels (destination passing, already scheduled, opaque to fusion):

* :func:`make_pack_kernel` ``(M, K) float32 -> (M, KW) uint64``: the run-time packing of activations.
* :func:`make_bgemm_kernel` ``(M, KW) uint64, (NT, KW, NB) uint64 -> (M, NT·NB) float32``: the product.  The weights
  are packed at compile time by :func:`pack_weights` into panels of ``NB`` output channels (``NB`` = a few vectors of
  ``uint64`` lanes), so the inner loop broadcasts one activation word, XORs it with ``NB/lanes`` weight vectors, and
  adds the popcounts into ``rows x NB`` accumulators held in registers (``llvm.ctpop`` on vectors: ``vpopcntq`` where
  the target has AVX512-VPOPCNTDQ, LLVM's nibble-table ``vpshufb`` + ``vpsadbw`` sequence on AVX2 / AVX-512 without
  it).  Tasks (parallel) own one weight panel (``KW·NB·8`` bytes, in L1) and a range of row tiles; the packed
  activations (``M·KW·8`` bytes) stay in L2.
"""

from __future__ import annotations

import dataclasses
import logging

from . import _env  # noqa: F401  (sets TVM_NUM_THREADS before tvm is imported)
import numpy as np
import tvm
from tvm.script import tirx as T

log = logging.getLogger(__name__)

_F32 = "float32"
_U64 = "uint64"
#: Bits per packed word.
WORD_BITS = 64
#: The product is exact while |result| <= n_in < 2^24 (float32's integer range).
MAX_INPUTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class BitChoice:
    """A schedule of the binary product: ``lanes`` uint64 lanes per vector (8 = AVX-512, 4 = AVX2, 2 = SSE),
    ``vectors`` weight vectors per panel (``NB = lanes * vectors`` output channels), ``rows`` activation rows per
    register tile (``rows * vectors`` vector accumulators), ``tasks`` the target number of parallel tasks."""

    lanes: int
    vectors: int
    rows: int
    tasks: int = 64

    @property
    def panel(self) -> int:
        """Output channels per weight panel (NB)."""
        return self.lanes * self.vectors


def choose_bit_kernel(m: int, n: int, vector_bits: int) -> BitChoice:
    """The schedule for an ``(m, n)`` output on a CPU with ``vector_bits`` wide vectors.

    AVX-512 (32 registers): 4 rows x 4 vectors = 16 accumulators + 4 weight vectors + a broadcast.  AVX2 (16
    registers; each popcount needs a table, a mask and temporaries): 4 rows x 2 vectors.  A narrower panel is taken
    when ``n`` is small so little padding is computed.  Vector counts stay powers of two: a panel of 3 vectors
    made LLVM split the 24-lane operations badly (27x slower).

    Measured on the development host (AMD EPYC Zen 4, 1 thread, 197 x 768 x 3072 product alone, shared machine):
    AVX-512 4x4 0.44 ms, 5x4 0.47, 6x4 0.48, 8x2 0.48, 4x2 0.52, 4x1 0.50 (rows x vectors); AVX2 4x2 1.86-1.94 ms,
    3x2 1.95-2.02, 2x4 1.99-2.04, 6x1 2.0, but 2x2 6.0 and 4x1 4.0-6.5.
    """
    if vector_bits >= 512:
        lanes, vectors, rows = 8, 4, 4
    elif vector_bits >= 256:
        lanes, vectors, rows = 4, 2, 4
    else:
        lanes, vectors, rows = 2, 2, 3
    while vectors > 1 and lanes * vectors >= 2 * n:
        vectors //= 2
    return BitChoice(lanes, vectors, min(rows, max(m, 1)))


def words_of(n_in: int) -> int:
    """Packed words per row of ``n_in`` signs."""
    return (n_in + WORD_BITS - 1) // WORD_BITS


def pack_signs_np(s: np.ndarray) -> np.ndarray:
    """Pack the last axis of ``s`` into uint64 words: bit ``j`` of word ``k`` is set where ``not s[..., 64k+j] >=
    0`` (the kernel's convention); padding bits are 0.  Shape ``(..., words_of(n))``."""
    s = np.asarray(s)
    n = s.shape[-1]
    kw = words_of(n)
    neg = ~(s >= 0)
    padded = np.zeros(s.shape[:-1] + (kw * WORD_BITS,), dtype=np.uint8)
    padded[..., :n] = neg
    # little-endian bit order inside each byte, bytes little-endian inside the word: bit j of the word is input j
    return np.packbits(padded, axis=-1, bitorder="little").view("<u8").astype(np.uint64).reshape(s.shape[:-1] + (kw,))


def pack_weights(w_in_out: np.ndarray, panel: int) -> np.ndarray:
    """Pack a ``(n_in, n_out)`` ±1 weight (the right operand of ``x @ W``) into panels ``(NT, KW, panel)`` uint64:
    ``[t, k, j]`` holds word ``k`` of output channel ``t*panel + j``; channels past ``n_out`` are zero words."""
    k_in, n_out = w_in_out.shape
    nt = (n_out + panel - 1) // panel
    cols = pack_signs_np(np.ascontiguousarray(w_in_out.T))  # (n_out, KW)
    out = np.zeros((nt * panel, cols.shape[1]), dtype=np.uint64)
    out[:n_out] = cols
    return np.ascontiguousarray(out.reshape(nt, panel, -1).transpose(0, 2, 1))


def _or_reduce(vec, lanes: int):
    """OR of the ``lanes`` lanes of a vector expression, by halving shuffles (a scalar at the end)."""
    while lanes > 1:
        half = lanes // 2
        lo = T.Shuffle([vec], [T.int32(i) for i in range(half)])
        hi = T.Shuffle([vec], [T.int32(i) for i in range(half, lanes)])
        vec, lanes = T.bitwise_or(lo, hi), half
    return vec


def _sign_bits(X, row, start, lanes: int, dtype: str):
    """Lanes ``start .. start+lanes-1`` of row ``row`` as a ``dtype`` word (lanes = its bit width): bit ``j`` set
    where ``not X[row, start + j] >= 0``.  One vector compare, a select of per-lane powers of two, an OR tree."""
    bits = T.shift_left(T.Broadcast(tvm.tirx.const(1, dtype), lanes),
                        T.Ramp(tvm.tirx.const(0, dtype), tvm.tirx.const(1, dtype), lanes))
    sel = T.Select(X[row, T.ramp(start, 1, lanes)] >= T.Broadcast(T.float32(0), lanes),
                   T.Broadcast(tvm.tirx.const(0, dtype), lanes), bits)
    return _or_reduce(sel, lanes)


def make_pack_kernel(m: int | None, k_in: int, vector_bits: int = 512) -> tvm.tirx.PrimFunc:
    """``f(X: (m, k_in) float32, XP: (m, KW) uint64)``: the packed signs of every row of X (module docstring);
    ``m=None``: a symbolic ``int64`` row count.

    A full word is one 64-lane compare and select reduced by OR (AVX-512: ``vcmpps`` into mask registers and masked
    moves), or, for narrower vectors, two 32-lane halves in uint32 (half the shuffle work on AVX2: 0.08 vs 0.11 ms
    for 197 x 768 on the development host, while AVX-512 prefers 64 lanes: 0.047 vs 0.071 ms).  The last, partial
    word is packed by a scalar loop.
    """
    kw = words_of(k_in)
    full = k_in // WORD_BITS
    tail = k_in - full * WORD_BITS
    wide = vector_bits >= 512
    if m is None:
        m = tvm.tirx.Var("m", "int64")

    def word(X, r, k):
        if wide:
            return _sign_bits(X, r, k * WORD_BITS, 64, _U64)
        lo = T.Cast(_U64, _sign_bits(X, r, k * WORD_BITS, 32, "uint32"))
        hi = T.Cast(_U64, _sign_bits(X, r, k * WORD_BITS + 32, 32, "uint32"))
        return T.bitwise_or(lo, T.shift_left(hi, T.uint64(32)))

    @T.prim_func(s_tir=True)
    def pack(X: T.Buffer((m, k_in), _F32), XP: T.Buffer((m, kw), _U64)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        with T.sblock("root"):
            for r in T.parallel(m):
                acc = T.alloc_buffer((1,), _U64, scope="local")
                for k in range(full):
                    XP[r, k] = word(X, r, k)
                if tail > 0:
                    acc[0] = T.uint64(0)
                    for j in T.unroll(tail):
                        acc[0] = acc[0] | T.shift_left(
                            T.Select(X[r, full * WORD_BITS + j] >= T.float32(0), T.uint64(0), T.uint64(1)),
                            T.uint64(j))
                    XP[r, full] = acc[0]

    return pack


def make_bgemm_kernel(m: int | None, k_in: int, n_out: int, ch: BitChoice) -> tvm.tirx.PrimFunc:
    """``f(XP: (m, KW) uint64, WP: (NT, KW, NB) uint64, Y: (m, NT*NB) float32)`` with ``Y[r, c] = k_in - 2 *
    popcount(XP[r] xor W[c])`` (the ±1 dot product; columns past ``n_out`` are padding).  ``m=None``: the row
    count is a symbolic ``int64`` bound from the buffers at run time (a dynamic batch).

    Raises ValueError for an empty problem or ``k_in >= 2^24`` (the result would not be exact in float32).
    """
    if (m is not None and m < 1) or k_in < 1 or n_out < 1:
        raise ValueError(f"binary product needs non-empty (m, k_in, n_out), got ({m}, {k_in}, {n_out})")
    if k_in >= MAX_INPUTS:
        raise ValueError(f"k_in={k_in} inputs: a ±1 dot product over >= 2^24 inputs is not exact in float32")
    kw = words_of(k_in)
    NB, MB = ch.panel, ch.rows
    nt = (n_out + NB - 1) // NB
    # split the row tiles into chunks so that there are about ch.tasks parallel tasks
    chunks = max(1, (ch.tasks + nt - 1) // nt)
    if m is None:
        m = tvm.tirx.Var("m", "int64")
        mt = (m + MB - 1) // MB
        per = (mt + chunks - 1) // chunks

        def wide(e):
            return T.Cast("int64", e)
    else:
        mt = (m + MB - 1) // MB
        chunks = min(mt, chunks)
        per = (mt + chunks - 1) // chunks
        chunks = (mt + per - 1) // per

        def wide(e):
            return e
    kf = T.float32(float(k_in))

    @T.prim_func(s_tir=True)
    def bgemm(XP: T.Buffer((m, kw), _U64), WP: T.Buffer((nt, kw, NB), _U64), Y: T.Buffer((m, nt * NB), _F32)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        with T.sblock("root"):
            for task in T.parallel(nt * chunks):
                acc = T.alloc_buffer((MB, NB), _U64, scope="local")
                for tt in range(per):
                    if wide(task % chunks) * per + tt < mt:
                        for i in T.unroll(MB):
                            for j in T.vectorized(NB):
                                acc[i, j] = T.uint64(0)
                        for k in range(kw):
                            for i in T.unroll(MB):
                                for j in T.vectorized(NB):
                                    # rows past m re-read (and below re-write) the last row: same value, no branch
                                    acc[i, j] = acc[i, j] + T.popcount(T.bitwise_xor(
                                        XP[T.min((wide(task % chunks) * per + tt) * MB + i, m - 1), k],
                                        WP[task // chunks, k, j]))
                        for i in T.unroll(MB):
                            for j in T.vectorized(NB):
                                Y[T.min((wide(task % chunks) * per + tt) * MB + i, m - 1),
                                  (task // chunks) * NB + j] = \
                                    kf - T.float32(2.0) * T.Cast(_F32, T.Cast("int32", acc[i, j]))

    return bgemm


def padded_outputs(n_out: int, ch: BitChoice) -> int:
    """Columns of the product's output buffer (``n_out`` rounded up to whole panels)."""
    return (n_out + ch.panel - 1) // ch.panel * ch.panel
