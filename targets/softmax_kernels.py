"""Hand-written TIR softmax kernels for CPU targets (last axis, float32).

Three algorithms, all free of libm ``expf`` calls (a polynomial exp is inlined):

* **three-pass** ("3p-store", ORT's structure): max pass; ``y = exp(x - max)`` stored and summed; scale pass in
  place.  Traffic 3 reads + 2 writes per element; best while a row stays in cache between passes.
* **two-pass** (Dukhan & Ablavatski 2020, XNNPACK ``f32-raddextexp`` + ``f32-vscaleextexp``): ``exp(x)`` is held as
  a pair ``(mantissa p, exponent n)`` so no max pass is needed.  Pass 1 accumulates the extended-range sum, pass 2
  recomputes ``(p, n)`` and writes ``p / v* * 2^(n - e*)``, flushed to 0 below FLT_MIN.  Traffic 2 reads + 1 write; best when rows leave the
  cache between passes (rows larger than the last-level cache, or pass-split layouts).
* **recompute** (split layout only): sweep 1 per chunk: chunk max, then the sum of ``exp(x - m_c)`` while the chunk
  is in L2, nothing stored; per row the partials combine; sweep 2 writes ``exp(x - M) / S``.  Traffic 2 reads + 1
  write with two plain exps per element: the choice for rows beyond L2 on both ISAs.

Layouts:

* **fused**: every row is processed start to end by one parallel task (rows are split over tasks).
* **split**: each row is cut into chunks; each pass is one parallel sweep over (row, chunk) pairs, partial results
  go through a small global scratch buffer, so few long rows use all threads.  Two-pass: ``chunks`` equal chunks
  (must divide the row).  Three-pass ("blocked"): chunks of a vector-multiple length, the last one shorter, sized
  to stay in L2 (:data:`BLOCK_FLOATS`); a chunk's max and exp-store passes run back to back, the per-chunk
  (max, sum) partials combine per row, and one sweep scales every chunk by ``exp(m_c - M) / S``: 2 reads + 2
  writes per element from memory with one exp each (plain three-pass over a row beyond the cache: 3 + 2).

Numerics: inputs are clamped to ``[-CLAMP, CLAMP]`` (two-pass); three-pass selects exactly 0 wherever
``x - max < -87`` (the polynomial's value there, even NaN, is discarded), so masked logits (``-inf``, ``finfo.min``)
never produce NaN; a fully masked row gives the uniform distribution.  No kernel writes subnormal outputs: values
below FLT_MIN (2^-126) are flushed to 0.

The entry points are :func:`make_softmax_kernel` (an explicit choice) and :func:`choose_kernel` (the rule table).
"""

from __future__ import annotations

import dataclasses
import logging
import math

from . import _env  # noqa: F401  (sets TVM_NUM_THREADS before tvm is imported)
import tvm
from tvm.script import tirx as T

log = logging.getLogger(__name__)

# --- constants (float32, XNNPACK's f32 p5 exp) -------------------------------------------------------------------
_LOG2E = float.fromhex("0x1.715476p+0")
_MINUS_LN2_HI = -float.fromhex("0x1.62E43p-1")
_MINUS_LN2_LO = float.fromhex("0x1.05C61p-29")  # XNNPACK's vminus_ln2_lo (positive)
_MINUS_LN2 = -float.fromhex("0x1.62E430p-1")  # -ln 2 rounded to float32 (one-step reduction)
_C1 = float.fromhex("0x1.FFFFF6p-1")
_C2 = float.fromhex("0x1.FFFDC6p-2")
_C3 = float.fromhex("0x1.555A80p-3")
_C4 = float.fromhex("0x1.573A1Ap-5")
_C5 = float.fromhex("0x1.0F9F9Cp-7")
_MAGIC = float.fromhex("0x1.8000FEp23")  # ulp 1, low 9 mantissa bits == 127
#: Two-pass input clamp: |x| above this breaks the Cody-Waite range reduction (and -inf would give NaN).
CLAMP = 1.0e5
_NEG_BIG = -3.0e38  # finite "-inf" for accumulator initialisation
_FLT_MIN = float.fromhex("0x1p-126")  # smallest normal float32
#: Unrolled steps (U*V elements each) summed by the inner accumulators before they are folded into the outer ones.
_SUM_BLOCK = 64
_F32 = "float32"

#: Software prefetch distance of the two-pass kernel (floats; 4 KiB ahead).  Measured on the Intel AVX-512 host,
#: 2 threads: 1 GiB row 221 -> 182 ms (77 % -> 94 % of copy bandwidth), 16M row 13.3 -> 8.2 ms; 512-2048 equal.
PREFETCH_FLOATS = 1024

#: Target chunk length (floats) of the blocked three-pass layout: a chunk of X plus its chunk of Y (2 x 128 KiB) stay
#: in the L2 of every x86 target (Zen 3 512 KiB) between the chunk's max pass and its exp pass.  16K-64K measured
#: alike within the noise of the shared Zen 4 host (16M row, AVX2 and AVX-512, 1T and 2T).
BLOCK_FLOATS = 32768

# Cache sizes (bytes) used by the rule table; conservative defaults for AMD Zen 4 (1 MiB L2, 32 MiB L3).
_L2_BYTES = 1 << 20
_L3_BYTES = 32 << 20


def _f(v: float):
    return T.float32(v)


def _exp_poly(x, n, const):
    """The one exp polynomial: ``exp(x) = p * 2^n`` with ``t = x - n·ln2`` (Cody–Waite, hi/lo) and ``p`` the
    degree-5 polynomial in ``t`` (Horner with fma). ``const`` makes a constant of the operands' type (scalar or
    vector)."""
    t = T.fma(n, const(_MINUS_LN2_LO), T.fma(n, const(_MINUS_LN2_HI), x))
    p = T.fma(t, const(_C5), const(_C4))
    for c in (_C3, _C2, _C1, 1.0):
        p = T.fma(p, t, const(c))
    return p


def _ext(x):
    """Extended-range exp: return TIR expressions ``(p, n)`` with ``exp(x) = p * 2^n``, ``p`` in ~[0.71, 1.42]."""
    n = T.nearbyint(x * _f(_LOG2E))
    return _exp_poly(x, n, _f), n


def _pow2_nonpos(d):
    """``2^d`` for integer-valued float ``d <= 0``; exactly 0 for ``d <= -127`` (magic-bias trick)."""
    b = T.reinterpret("int32", T.max(d, _f(-127.0)) + _f(_MAGIC))
    return T.reinterpret(_F32, T.shift_left(b, T.int32(23)))


def _scalef16(x, d):
    """``x * 2^floor(d)`` on explicit <16 x float> vectors with AVX-512 ``vscalefps`` (exact; 0 for d = -inf)."""
    return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.mask.scalef.ps.512", x, d, x, T.int16(-1),
                                   T.int32(4))


def _flush(y):
    """0 where ``y`` is below the smallest normal float32 (outputs are never subnormal: consumers would pay
    microcode assists, and such values are within the 1e-37 absolute accuracy bound)."""
    return T.Select(y >= _f(_FLT_MIN), y, _f(0.0))


def _b16(v: float):
    return T.Broadcast(_f(v), 16)


def _ext16(x):
    """:func:`_ext` on an explicit <16 x float> vector."""
    n = T.nearbyint(x * _b16(_LOG2E))
    return _exp_poly(x, n, _b16), n


def _pow2_int(d):
    """``2^d`` for integer-valued float ``d``, clamped to [-126, 127] (always a normal float)."""
    i = T.Cast("int32", T.min(T.max(d, _f(-126.0)), _f(127.0)))
    return T.reinterpret(_F32, T.shift_left(i + T.int32(127), T.int32(23)))


def _add(a, b):
    return a + b


def _tree(values: list, op):
    """Combine equal-typed TIR expressions pairwise (a balanced tree, not a serial chain)."""
    while len(values) > 1:
        values = [op(values[i], values[i + 1]) if i + 1 < len(values) else values[i]
                  for i in range(0, len(values), 2)]
    return values[0]


def _hreduce(vec, lanes: int, op):
    """Horizontal reduction of a ``lanes``-wide vector expression by halving shuffles (``vextractf128`` /
    ``vshufpd`` / ``vmovshdup`` after LLVM), ending in a scalar.  LLVM merges the repeated sub-expressions."""
    while lanes > 1:
        half = lanes // 2
        lo = T.Shuffle([vec], [T.int32(i) for i in range(half)]) if half > 1 else T.Shuffle([vec], [T.int32(0)])
        hi = T.Shuffle([vec], [T.int32(i) for i in range(half, lanes)]) if half > 1 else \
            T.Shuffle([vec], [T.int32(1)])
        vec, lanes = op(lo, hi), half
    return vec


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """A softmax kernel configuration.

    algo: ``"two_pass"``, ``"three_pass"`` or ``"recompute"`` (split only); layout: ``"fused"`` or ``"split"``;
    vector_lanes: fp32 lanes per
    vector (8 = AVX2, 16 = AVX-512); unroll: independent vector accumulators; chunks: chunks per row (split only);
    tasks: parallel tasks of the fused layout; scalef: use AVX-512 ``vscalefps`` for ``x * 2^d`` (two-pass).
    """

    algo: str
    layout: str
    vector_lanes: int
    unroll: int
    chunks: int = 1
    tasks: int = 64
    scalef: bool = False  # AVX-512 only: powers of two with vscalefps (two-pass), needs vector_lanes == 16
    prefetch: int = 0  # two-pass: software prefetch distance in floats (0 = none; X read, Y write-prefetched);
    # three-pass split (blocked) and recompute: > 0 = a chunk's exp(-sum) pass prefetches the next chunk


def _prefetch(buf, row, idx, write: int):
    """``prefetcht0`` (``write`` = 1: ``prefetchw``) of ``buf[row, idx]``; past-the-end addresses are harmless."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(buf[row, idx]), T.int32(write),
                                         T.int32(3), T.int32(1)))


def _pick_unroll(length: int, lanes: int, unroll: int) -> int:
    while unroll > 1 and length < 2 * unroll * lanes:
        unroll //= 2
    return unroll


def _pick_chunks(n: int, lanes: int, want: int) -> int:
    for c in (want, 32, 16, 8, 4, 2):
        if c <= want and n % c == 0 and n // c >= 4 * lanes:
            return c
    return 1


def choose_kernel(rows: int, cols: int, vector_bits: int, threads: int, mcpu: str = "znver4") -> KernelChoice:
    """Pick a softmax kernel for a (rows, cols) fp32 problem (the rule table).

    Rules, from measurements (AMD Zen 4 measurements made before this project; ``tools/bench/lowering.py`` on the Intel
    AVX-512 development host, 2 cores):

    ===================  =====================================================  ======================================
    ISA                  shape                                                  kernel
    ===================  =====================================================  ======================================
    AVX2, AVX-512        row <= 256K floats, unless few rows of >= 64K floats   three-pass, fused, U=4
    AVX2, AVX-512        row > 256K floats, or few rows of >= 64K floats        recompute, 32K-float chunks, prefetch
    ===================  =====================================================  ======================================

    Reasoning: in cache the arithmetic decides: three-pass evaluates exp once (3R+2W, all but the first read from
    cache).  Beyond L2 the bytes decide: the recompute kernel moves 2R+1W with two plain exps per element; the
    blocked three-pass 2R+2W with one; the extended-range two-pass 2R+1W with two exps plus ~8 vector ops of
    bookkeeping (compute bound on AVX2: 0.4-0.7x the three-pass).  Measured on the shared Zen 4 host, 16M-float row,
    interleaved rounds: recompute faster than blocked three-pass in 10 of 12 rounds on AVX2 (~5-25 %), faster
    than the AVX-512 two-pass (``vscalefps``, 4 KiB prefetch, the previous AVX-512 rule) in 6 of 6 (20-40 %);
    prefetching the next chunk during a chunk's first sweep gained ~5 % (5 of 6 rounds).  Earlier measurements
    (before the recompute kernel): Zen 4 16M row 2T two-pass 5.99 ms vs three-pass 8.56 ms; Intel AVX-512 host 1T
    16M row two-pass 28.5 ms vs three-pass 30.7 ms vs ORT 31.4 ms, 4096x4096 three-pass 21.0 vs two-pass 22.8 ms.
    ``mcpu`` is accepted for per-CPU rules; none differ at present.
    """
    lanes = 16 if vector_bits >= 512 else 8
    big_row = cols * 4 > _L2_BYTES
    few_rows = rows < max(threads, 1) * 2
    if big_row or (few_rows and cols >= 2 * BLOCK_FLOATS):
        return KernelChoice("recompute", "split", lanes, 4, -(-cols // BLOCK_FLOATS), prefetch=1)
    return KernelChoice("three_pass", "fused", lanes, _pick_unroll(cols, lanes, 4), 1, min(rows, 64))


def mcpu_of(target) -> str:
    """The ``mcpu`` of an llvm target ("" when unset)."""
    return str(target.attrs["mcpu"]) if "mcpu" in target.attrs else ""


# --- macros shared by the kernels -------------------------------------------------------------------------------


def _build_two_pass(rows: int, cols: int, ch: KernelChoice) -> tvm.tirx.PrimFunc:
    V, U = ch.vector_lanes, _pick_unroll(cols // ch.chunks, ch.vector_lanes, ch.unroll)
    C = ch.chunks
    L = cols // C  # elements per chunk
    NB = L // (U * V)  # full unrolled blocks
    NV = (L - NB * U * V) // V  # remaining full vectors
    NS = L - NB * U * V - NV * V  # scalar tail
    lo, hi = _f(-CLAMP), _f(CLAMP)

    def clamp(x):
        return T.min(T.max(x, lo), hi)

    SCALEF = ch.scalef and V == 16
    PF = ch.prefetch
    BI = _SUM_BLOCK
    NBB = NB // BI  # full blocks of BI unrolled steps

    @T.macro
    def acc_add(accv, acce, u, l, x):
        pn = T.meta_var(_ext(clamp(x)))
        m = T.meta_var(T.max(acce[u, l], pn[1]))
        accv[u, l] = accv[u, l] * _pow2_nonpos(acce[u, l] - m) + pn[0] * _pow2_nonpos(pn[1] - m)
        acce[u, l] = m

    @T.macro
    def acc_add16(accv, acce, u, Xf, row, base):
        pn = T.meta_var(_ext16(T.min(T.max(Xf[row, T.ramp(base, 1, 16)], _b16(-CLAMP)), _b16(CLAMP))))
        m = T.meta_var(T.max(acce[u, T.ramp(0, 1, 16)], pn[1]))
        accv[u, T.ramp(0, 1, 16)] = _scalef16(accv[u, T.ramp(0, 1, 16)], acce[u, T.ramp(0, 1, 16)] - m) + \
            _scalef16(pn[0], pn[1] - m)
        acce[u, T.ramp(0, 1, 16)] = m

    @T.macro
    def ext_init(accv, acce, base):
        for u in T.unroll(U):
            for l in T.vectorized(V):
                accv[base + u, l] = _f(0.0)
                acce[base + u, l] = _f(_NEG_BIG)

    @T.macro
    def ext_fold(accv, acce, dst, src):
        # accumulators dst..dst+U-1 (+)= src..src+U-1, extended-range addition
        for u in T.unroll(U):
            for l in T.vectorized(V):
                mf = T.meta_var(T.max(acce[dst + u, l], acce[src + u, l]))
                accv[dst + u, l] = accv[dst + u, l] * _pow2_nonpos(acce[dst + u, l] - mf) + \
                    accv[src + u, l] * _pow2_nonpos(acce[src + u, l] - mf)
                acce[dst + u, l] = mf

    @T.macro
    def ext_step(Xf, accv, acce, row, start, i):
        if PF > 0:
            for k in T.unroll(U * V // 16):
                _prefetch(Xf, row, start + i * U * V + PF + k * 16, 0)
        for u in T.unroll(U):
            if SCALEF:
                acc_add16(accv, acce, u, Xf, row, start + (i * U + u) * V)
            else:
                for l in T.vectorized(V):
                    acc_add(accv, acce, u, l, Xf[row, start + (i * U + u) * V + l])

    @T.macro
    def extsum(Xf, accv, acce, sv, se, row, start):
        # accumulators 0..U-1 sum blocks of BI steps; U..2U-1 sum the blocks (two-level: float32 error grows with
        # BI + NB/BI terms instead of NB)
        ext_init(accv, acce, 0)
        if NBB > 0:
            ext_init(accv, acce, U)
            for ib in range(NBB):
                for ii in range(BI):
                    ext_step(Xf, accv, acce, row, start, ib * BI + ii)
                ext_fold(accv, acce, U, 0)
                ext_init(accv, acce, 0)
        for i in range(NB - NBB * BI):
            ext_step(Xf, accv, acce, row, start, NBB * BI + i)
        if NBB > 0:
            ext_fold(accv, acce, 0, U)
        for i in range(NV):
            for l in T.vectorized(V):
                acc_add(accv, acce, 0, l, Xf[row, start + NB * U * V + i * V + l])
        for j in T.unroll(NS):
            acc_add(accv, acce, 0, j, Xf[row, start + NB * U * V + NV * V + j])
        # combine the U accumulators into row 0 (vectorized), then the V lanes by halving shuffles
        for u in range(1, U):
            for l in T.vectorized(V):
                mm = T.meta_var(T.max(acce[0, l], acce[u, l]))
                accv[0, l] = accv[0, l] * _pow2_nonpos(acce[0, l] - mm) + accv[u, l] * _pow2_nonpos(acce[u, l] - mm)
                acce[0, l] = mm
        se[0] = _hreduce(acce[0, T.ramp(0, 1, V)], V, T.max)
        for l in T.vectorized(V):
            accv[0, l] = accv[0, l] * _pow2_nonpos(acce[0, l] - se[0])
        sv[0] = _hreduce(accv[0, T.ramp(0, 1, V)], V, _add)

    @T.macro
    def extscale(Xf, Yf, row, start, inv, e):
        for i in range(L // V):
            if PF > 0 and i % (16 // V) == 0:
                _prefetch(Xf, row, start + i * V + PF, 0)
                _prefetch(Yf, row, start + i * V + PF, 1)
            if SCALEF:
                pv = T.meta_var(_ext16(T.min(T.max(Xf[row, T.ramp(start + i * V, 1, 16)], _b16(-CLAMP)),
                                             _b16(CLAMP))))
                yv = T.meta_var(_scalef16(pv[0] * T.Broadcast(inv, 16), pv[1] - T.Broadcast(e, 16)))
                Yf[row, T.ramp(start + i * V, 1, 16)] = T.Select(yv >= _b16(_FLT_MIN), yv, _b16(0.0))
            else:
                for l in T.vectorized(V):
                    pn = T.meta_var(_ext(clamp(Xf[row, start + i * V + l])))
                    Yf[row, start + i * V + l] = _flush(pn[0] * inv * _pow2_int(pn[1] - e))
        for j in range(L - (L // V) * V):
            pn2 = T.meta_var(_ext(clamp(Xf[row, start + (L // V) * V + j])))
            Yf[row, start + (L // V) * V + j] = _flush(pn2[0] * inv * _pow2_int(pn2[1] - e))

    if ch.layout == "fused":
        P = max(1, min(ch.tasks, rows))
        RPT = (rows + P - 1) // P

        @T.prim_func(s_tir=True)
        def kernel(X: T.Buffer((rows, cols), _F32), Y: T.Buffer((rows, cols), _F32)):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
            with T.sblock("root"):
                for task in T.parallel(P):
                    accv = T.alloc_buffer((2 * U, V), _F32, scope="local")
                    acce = T.alloc_buffer((2 * U, V), _F32, scope="local")
                    sv = T.alloc_buffer((1,), _F32, scope="local")
                    se = T.alloc_buffer((1,), _F32, scope="local")
                    for rr in range(RPT):
                        if task * RPT + rr < rows:
                            extsum(X, accv, acce, sv, se, task * RPT + rr, 0)
                            extscale(X, Y, task * RPT + rr, 0, _f(1.0) / sv[0], se[0])

        return kernel

    W = rows * C

    @T.prim_func(s_tir=True)
    def kernel_split(X: T.Buffer((rows, cols), _F32), Y: T.Buffer((rows, cols), _F32)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        with T.sblock("root"):
            PV = T.alloc_buffer((W,), _F32)
            PE = T.alloc_buffer((W,), _F32)
            for w in T.parallel(W):
                accv = T.alloc_buffer((2 * U, V), _F32, scope="local")
                acce = T.alloc_buffer((2 * U, V), _F32, scope="local")
                sv = T.alloc_buffer((1,), _F32, scope="local")
                se = T.alloc_buffer((1,), _F32, scope="local")
                extsum(X, accv, acce, sv, se, w // C, (w % C) * L)
                PV[w] = sv[0]
                PE[w] = se[0]
            for w in T.parallel(W):
                tv = T.alloc_buffer((1,), _F32, scope="local")
                te = T.alloc_buffer((1,), _F32, scope="local")
                te[0] = PE[(w // C) * C]
                for c in range(1, C):
                    te[0] = T.max(te[0], PE[(w // C) * C + c])
                tv[0] = _f(0.0)
                for c in range(C):
                    tv[0] = tv[0] + PV[(w // C) * C + c] * _pow2_nonpos(PE[(w // C) * C + c] - te[0])
                extscale(X, Y, w // C, (w % C) * L, _f(1.0) / tv[0], te[0])

    return kernel_split


def _expneg(z):
    """``exp(z)`` for ``z <= 0`` (XNNPACK rr1-p5 structure): magic-bias rounding ``n = round(z·log2 e)``, one-step
    reduction ``t = z - n·ln2`` (|n| <= 126 keeps its error near 1 ulp), ``exp(z) = s + (t·s)·p(t)`` with
    ``s = 2^n`` built by shifting the biased integer.  Exactly 0 for ``z < -87`` (masked logits, ``finfo.min``,
    ``-inf``: the polynomial may see garbage or NaN there, the select discards it; never subnormal).  No clamp: one
    constant and one op fewer than clamping first, which matters with 16 AVX2 registers.  Scalar or vector ``z``
    (the constants are scalars that LLVM broadcasts)."""
    vn = T.fma(z, _f(_LOG2E), _f(_MAGIC))
    s = T.reinterpret(_F32, T.shift_left(T.reinterpret("int32", vn), T.int32(23)))
    n = vn - _f(_MAGIC)
    t = T.fma(n, _f(_MINUS_LN2), z)
    p = T.fma(t, _f(_C5), _f(_C4))
    for c in (_C3, _C2, _C1):
        p = T.fma(p, t, _f(c))
    return T.Select(z >= _f(-87.0), T.fma(t * s, p, s), _f(0.0))


def _block_geometry(cols: int, chunks: int, lanes: int) -> tuple[int, int, int]:
    """(C, L, L_last) for cutting a row of ``cols`` into at most ``chunks`` pieces: ``L`` a multiple of the vector
    width, ``C = ceil(cols / L)`` chunks, the last ``0 < L_last <= L`` long (rows need not divide evenly)."""
    chunks = max(1, min(chunks, cols))
    L = -(-cols // chunks)
    L = -(-L // lanes) * lanes
    C = -(-cols // L)
    return C, L, cols - (C - 1) * L


def _three_pass_macros(L: int, U: int, V: int, S: int, ahead: int = 0, store: bool = True):
    """The three-pass building blocks for segments of length ``L`` (a whole row or one chunk of it; an int, or a
    symbolic int64 ``tirx.Var``: the run-time row length of :func:`make_symbolic_softmax_kernel`).

    ``acc`` is one (2U+1, V) local buffer per task: rows 0..U-1 the running vectors, U..2U-1 the two-level sum
    blocks, row ``S = 2U`` the segment's results (``[S, 0]`` max, ``[S, 1]`` sum of exps).  One buffer, not three:
    each local buffer costs a workspace allocation per row.  ``ahead`` > 0: the exp pass prefetches X that many
    floats ahead (one ``prefetcht0`` per 64 bytes; the blocked layout passes the chunk length, so the next chunk's
    max pass reads from cache while this chunk's arithmetic runs).  ``store`` False: ``expstore`` only sums the
    exps (the recompute kernel's first sweep) and ``expscale`` writes ``exp(x - mx)`` scaled."""
    NB = L // (U * V)
    NV = (L - NB * U * V) // V
    NS = L - NB * U * V - NV * V
    LV = L // V
    LS = L - LV * V
    BI = _SUM_BLOCK
    NBB = NB // BI
    floor = _f(_NEG_BIG)
    tail = T.unroll if isinstance(L, int) else T.serial  # a symbolic L (run-time row length): tails stay loops

    @T.macro
    def rowmax(Xf, acc, row, start):
        for u in T.unroll(U):
            for l in T.vectorized(V):
                acc[u, l] = floor
        for i in range(NB):
            for u in T.unroll(U):
                for l in T.vectorized(V):
                    acc[u, l] = T.max(acc[u, l], Xf[row, start + (i * U + u) * V + l])
        for i in range(NV):
            for l in T.vectorized(V):
                acc[0, l] = T.max(acc[0, l], Xf[row, start + NB * U * V + i * V + l])
        for j in tail(NS):
            acc[0, j] = T.max(acc[0, j], Xf[row, start + NB * U * V + NV * V + j])
        acc[S, 0] = _hreduce(_tree([acc[u, T.ramp(0, 1, V)] for u in range(U)], T.max), V, T.max)

    @T.macro
    def exp_step(Xf, Yf, acc, row, start, mx, i):
        if ahead > 0:
            for k in T.unroll(U * V // 16):
                _prefetch(Xf, row, start + ahead + i * U * V + k * 16, 0)
        for u in T.unroll(U):
            for l in T.vectorized(V):
                if store:
                    Yf[row, start + (i * U + u) * V + l] = _expneg(Xf[row, start + (i * U + u) * V + l] - mx)
                    acc[u, l] = acc[u, l] + Yf[row, start + (i * U + u) * V + l]
                else:
                    acc[u, l] = acc[u, l] + _expneg(Xf[row, start + (i * U + u) * V + l] - mx)

    @T.macro
    def expstore(Xf, Yf, acc, row, start, mx):
        # the stored value is re-read (``noalias`` is lost in parallel closures, so LLVM would recompute the exp);
        # two-level sum as in the two-pass kernel: rows U..2U-1 collect blocks of BI steps
        for u in T.unroll(U):
            for l in T.vectorized(V):
                acc[u, l] = _f(0.0)
        if NBB > 0:
            for u in T.unroll(U):
                for l in T.vectorized(V):
                    acc[U + u, l] = _f(0.0)
            for ib in range(NBB):
                for ii in range(BI):
                    exp_step(Xf, Yf, acc, row, start, mx, ib * BI + ii)
                for u in T.unroll(U):
                    for l in T.vectorized(V):
                        acc[U + u, l] = acc[U + u, l] + acc[u, l]
                        acc[u, l] = _f(0.0)
        for i in range(NB - NBB * BI):
            exp_step(Xf, Yf, acc, row, start, mx, NBB * BI + i)
        if NBB > 0:
            for u in T.unroll(U):
                for l in T.vectorized(V):
                    acc[u, l] = acc[u, l] + acc[U + u, l]
        for i in range(NV):
            for l in T.vectorized(V):
                if store:
                    Yf[row, start + NB * U * V + i * V + l] = _expneg(Xf[row, start + NB * U * V + i * V + l] - mx)
                    acc[0, l] = acc[0, l] + Yf[row, start + NB * U * V + i * V + l]
                else:
                    acc[0, l] = acc[0, l] + _expneg(Xf[row, start + NB * U * V + i * V + l] - mx)
        for j in tail(NS):
            if store:
                Yf[row, start + NB * U * V + NV * V + j] = _expneg(Xf[row, start + NB * U * V + NV * V + j] - mx)
                acc[0, j] = acc[0, j] + Yf[row, start + NB * U * V + NV * V + j]
            else:
                acc[0, j] = acc[0, j] + _expneg(Xf[row, start + NB * U * V + NV * V + j] - mx)
        acc[S, 1] = _hreduce(_tree([acc[u, T.ramp(0, 1, V)] for u in range(U)], _add), V, _add)

    @T.macro
    def scale(Yf, row, start, thr, f):
        # y = e * f, with e zeroed first where the product would be subnormal (e < thr = FLT_MIN / f): subnormal
        # probabilities cost ~100-cycle microcode assists in every consumer (P.V ran 8x slower) and are below the
        # 1e-37 absolute accuracy bound anyway; no subnormal is ever produced.
        for i in range(LV):
            for l in T.vectorized(V):
                Yf[row, start + i * V + l] = T.Select(Yf[row, start + i * V + l] >= thr,
                                                      Yf[row, start + i * V + l], _f(0.0)) * f
        for j in range(LS):
            Yf[row, start + LV * V + j] = T.Select(Yf[row, start + LV * V + j] >= thr,
                                                   Yf[row, start + LV * V + j], _f(0.0)) * f

    @T.macro
    def fill(Yf, row, start, value):
        for i in range(LV):
            for l in T.vectorized(V):
                Yf[row, start + i * V + l] = value
        for j in range(LS):
            Yf[row, start + LV * V + j] = value

    @T.macro
    def expscale(Xf, Yf, row, start, mx, thr, f):
        # y = exp(x - mx) * f, zeroed first where the product would be subnormal (see ``scale``)
        for i in range(LV):
            for l in T.vectorized(V):
                Yf[row, start + i * V + l] = T.Select(_expneg(Xf[row, start + i * V + l] - mx) >= thr,
                                                      _expneg(Xf[row, start + i * V + l] - mx), _f(0.0)) * f
        for j in range(LS):
            Yf[row, start + LV * V + j] = T.Select(_expneg(Xf[row, start + LV * V + j] - mx) >= thr,
                                                   _expneg(Xf[row, start + LV * V + j] - mx), _f(0.0)) * f

    if not store:
        return rowmax, expstore, expscale, fill
    return rowmax, expstore, scale, fill


#: Public handle on the three-pass row macros (max / exp-store-sum / scale / fill), for kernels that embed a row
#: softmax (:mod:`targets.attention_kernel`).
row_softmax_macros = _three_pass_macros
#: ... and the exp of non-positive arguments they use (exactly 0 below -87).
exp_nonpos = _expneg


def _build_three_pass(rows: int, cols: int, ch: KernelChoice) -> tvm.tirx.PrimFunc:
    V = ch.vector_lanes
    uniform = _f(1.0 / cols)  # a fully masked row (every logit -inf / finfo.min: all exps flushed) is uniform
    if ch.layout == "fused":
        return _fused_three_pass(rows, cols, _pick_unroll(cols, V, ch.unroll), V, max(1, min(ch.tasks, rows)),
                                 uniform, 0)

    # blocked: every (row, chunk) pair is one task; max and exp-store of a chunk run back to back while the chunk
    # is in L2, then per row the chunk results combine (M = max m_c, S = sum s_c exp(m_c - M)), then every chunk
    # is scaled by exp(m_c - M) / S.  Traffic 2 reads + 2 writes per element (plain three-pass over a row larger
    # than the cache: 3 + 2) with one exp per element (two-pass: two).  Rows need not divide into the chunks.
    C, L, LL = _block_geometry(cols, ch.chunks, V)
    U = _pick_unroll(min(L, LL) if LL >= 2 * V else L, V, ch.unroll)
    S = 2 * U
    rowmax_a, expstore_a, scale_a, fill_a = _three_pass_macros(L, U, V, S, L if ch.prefetch > 0 else 0)
    rowmax_b, expstore_b, scale_b, fill_b = _three_pass_macros(LL, U, V, S)
    W = rows * C

    @T.prim_func(s_tir=True)
    def kernel_split(X: T.Buffer((rows, cols), _F32), Y: T.Buffer((rows, cols), _F32)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        with T.sblock("root"):
            PM = T.alloc_buffer((W,), _F32)  # chunk max, then (after the combine) the chunk's scale factor
            PS = T.alloc_buffer((W,), _F32)  # chunk sum of exps, then the chunk's flush threshold
            for w in T.parallel(W):
                acc = T.alloc_buffer((2 * U + 1, V), _F32, scope="local")
                if w % C < C - 1:
                    rowmax_a(X, acc, w // C, (w % C) * L)
                    expstore_a(X, Y, acc, w // C, (w % C) * L, acc[S, 0])
                else:
                    rowmax_b(X, acc, w // C, (C - 1) * L)
                    expstore_b(X, Y, acc, w // C, (C - 1) * L, acc[S, 0])
                PM[w] = acc[S, 0]
                PS[w] = acc[S, 1]
            for r in T.parallel(rows):
                tot = T.alloc_buffer((2,), _F32, scope="local")
                tot[0] = PM[r * C]
                for c in range(1, C):
                    tot[0] = T.max(tot[0], PM[r * C + c])
                tot[1] = _f(0.0)
                for c in range(C):
                    tot[1] = tot[1] + PS[r * C + c] * _expneg(PM[r * C + c] - tot[0])
                for c in range(C):
                    if tot[1] > _f(0.0):
                        # factor e_c / S; threshold FLT_MIN / factor (3e38, i.e. all zero, when the factor is 0)
                        PM[r * C + c] = _expneg(PM[r * C + c] - tot[0]) / tot[1]
                        PS[r * C + c] = T.Select(PM[r * C + c] > _f(0.0), _f(_FLT_MIN) / PM[r * C + c],
                                                 _f(-_NEG_BIG))
                    else:
                        PM[r * C + c] = _f(-1.0)  # fully masked row: uniform
            for w in T.parallel(W):
                if PM[w] >= _f(0.0):
                    if w % C < C - 1:
                        scale_a(Y, w // C, (w % C) * L, PS[w], PM[w])
                    else:
                        scale_b(Y, w // C, (C - 1) * L, PS[w], PM[w])
                elif w % C < C - 1:
                    fill_a(Y, w // C, (w % C) * L, uniform)
                else:
                    fill_b(Y, w // C, (C - 1) * L, uniform)

    return kernel_split


def _build_recompute(rows: int, cols: int, ch: KernelChoice) -> tvm.tirx.PrimFunc:
    """Chunked two-read softmax: sweep 1 per (row, chunk): chunk max, then the sum of ``exp(x - m_c)`` while the
    chunk is in L2 (nothing stored); per row ``M = max m_c``, ``S = sum s_c exp(m_c - M)``; sweep 2 per chunk:
    ``y = exp(x - M) / S``.  Memory traffic 2 reads + 1 write per element (blocked three-pass: 2 + 2), paid for
    with a second exp per element: for rows beyond the last-level cache, where the arithmetic is idle anyway."""
    V = ch.vector_lanes
    uniform = _f(1.0 / cols)
    C, L, LL = _block_geometry(cols, ch.chunks, V)
    U = _pick_unroll(min(L, LL) if LL >= 2 * V else L, V, ch.unroll)
    S = 2 * U
    rowmax_a, expsum_a, expscale_a, fill_a = _three_pass_macros(L, U, V, S, L if ch.prefetch > 0 else 0, False)
    rowmax_b, expsum_b, expscale_b, fill_b = _three_pass_macros(LL, U, V, S, 0, False)
    W = rows * C

    @T.prim_func(s_tir=True)
    def kernel(X: T.Buffer((rows, cols), _F32), Y: T.Buffer((rows, cols), _F32)):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        with T.sblock("root"):
            PM = T.alloc_buffer((W,), _F32)
            PS = T.alloc_buffer((W,), _F32)
            RM = T.alloc_buffer((rows,), _F32)
            RS = T.alloc_buffer((rows,), _F32)
            for w in T.parallel(W):
                acc = T.alloc_buffer((2 * U + 1, V), _F32, scope="local")
                if w % C < C - 1:
                    rowmax_a(X, acc, w // C, (w % C) * L)
                    expsum_a(X, Y, acc, w // C, (w % C) * L, acc[S, 0])
                else:
                    rowmax_b(X, acc, w // C, (C - 1) * L)
                    expsum_b(X, Y, acc, w // C, (C - 1) * L, acc[S, 0])
                PM[w] = acc[S, 0]
                PS[w] = acc[S, 1]
            for r in T.parallel(rows):
                RM[r] = PM[r * C]
                for c in range(1, C):
                    RM[r] = T.max(RM[r], PM[r * C + c])
                RS[r] = _f(0.0)
                for c in range(C):
                    RS[r] = RS[r] + PS[r * C + c] * _expneg(PM[r * C + c] - RM[r])
            for w in T.parallel(W):
                if RS[w // C] > _f(0.0):
                    if w % C < C - 1:
                        expscale_a(X, Y, w // C, (w % C) * L, RM[w // C], _f(_FLT_MIN) * RS[w // C],
                                   _f(1.0) / RS[w // C])
                    else:
                        expscale_b(X, Y, w // C, (C - 1) * L, RM[w // C], _f(_FLT_MIN) * RS[w // C],
                                   _f(1.0) / RS[w // C])
                elif w % C < C - 1:
                    fill_a(Y, w // C, (w % C) * L, uniform)
                else:
                    fill_b(Y, w // C, (C - 1) * L, uniform)

    return kernel


def make_symbolic_softmax_kernel(lanes: int, unroll: int = 4, tasks: int = 64) -> tvm.tirx.PrimFunc:
    """The fused three-pass kernel for a softmax whose shape is known only at run time: a destination-passing
    PrimFunc ``f(X: (rows, cols) f32, Y: (rows, cols) f32)`` with ``rows`` and ``cols`` symbolic int64 (bound from
    the arguments' shapes), so one compiled function serves every batch and length.  Same passes, numerics and
    masking behaviour as the static fused three-pass kernel (:func:`make_softmax_kernel`), rows split over at most
    ``tasks`` parallel tasks; the vector / unroll tails are run-time loops instead of unrolled code.  Rows of any
    length are handled (rows beyond L2 would be faster with the static rule's chunked kernels)."""
    rows = tvm.tirx.Var("rows", "int64")
    cols = tvm.tirx.Var("cols", "int64")
    parallel = tvm.tirx.max(tvm.tirx.min(rows, tvm.tirx.const(tasks, "int64")), tvm.tirx.const(1, "int64"))
    return _fused_three_pass(rows, cols, unroll, lanes, parallel, _f(1.0) / tvm.tirx.Cast(_F32, cols),
                             tvm.tirx.const(0, "int64"))


def _fused_three_pass(rows, cols, U: int, V: int, P, uniform, zero) -> tvm.tirx.PrimFunc:
    """The fused three-pass kernel, static or symbolic: ``rows``/``cols`` are ints or int64 ``tirx.Var`` (bound from
    the arguments' shapes), ``P`` the parallel tasks (≥ 1), ``uniform`` the value of a fully masked row (1/cols),
    ``zero`` the row offset 0 in the index dtype.  Each task runs ``ceil(rows / P)`` whole rows: max, exp-store
    with the running sum, then scale (or fill with ``uniform`` when every exp flushed to 0)."""
    S = 2 * U
    rowmax, expstore, scale, fill = _three_pass_macros(cols, U, V, S)
    RPT = (rows + P - 1) // P  # rows per task

    @T.prim_func(s_tir=True)
    def kernel(x: T.handle, y: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
        X = T.match_buffer(x, (rows, cols), _F32)
        Y = T.match_buffer(y, (rows, cols), _F32)
        with T.sblock("root"):
            for task in T.parallel(P):
                acc = T.alloc_buffer((2 * U + 1, V), _F32, scope="local")
                acc[S, 1] = _f(0.0)  # touched here so the buffer is allocated once per task, not per row
                for rr in range(RPT):
                    if task * RPT + rr < rows:
                        rowmax(X, acc, task * RPT + rr, zero)
                        expstore(X, Y, acc, task * RPT + rr, zero, acc[S, 0])
                        if acc[S, 1] > _f(0.0):
                            scale(Y, task * RPT + rr, zero, _f(_FLT_MIN) * acc[S, 1], _f(1.0) / acc[S, 1])
                        else:
                            fill(Y, task * RPT + rr, zero, uniform)

    return kernel


def make_softmax_kernel(rows: int, cols: int, choice: KernelChoice) -> tvm.tirx.PrimFunc:
    """Build a destination-passing PrimFunc ``f(X: (rows, cols) f32, Y: (rows, cols) f32)`` computing the softmax of
    every row of X into Y.  The function is already scheduled (``tirx.is_scheduled``) and opaque to fusion.

    Split layouts: two-pass needs ``chunks`` to divide ``cols`` (ValueError otherwise); three-pass cuts rows into
    chunks of a vector-multiple length with a shorter last chunk (:func:`_block_geometry`), any ``cols``.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"softmax kernel needs a non-empty (rows, cols), got ({rows}, {cols})")
    if choice.algo == "two_pass" and choice.layout == "split" and cols % choice.chunks:
        raise ValueError(f"chunks={choice.chunks} does not divide cols={cols}")
    if choice.algo == "two_pass":
        f = _build_two_pass(rows, cols, choice)
    elif choice.algo == "three_pass":
        f = _build_three_pass(rows, cols, choice)
    elif choice.algo == "recompute":
        if choice.layout != "split":
            raise ValueError("the recompute softmax kernel has only the split layout")
        f = _build_recompute(rows, cols, choice)
    else:
        raise ValueError(f"unknown softmax algorithm {choice.algo!r}")
    log.debug("softmax kernel (%d, %d) %s", rows, cols, choice)
    return f


def build_kernel_library(rows: int, cols: int, choice: KernelChoice, target, name: str = "softmax"):
    """Compile one kernel alone into a runtime module with a single function ``name`` (destination passing)."""
    f = make_softmax_kernel(rows, cols, choice).with_attr("global_symbol", name)
    return tvm.compile(tvm.IRModule({name: f}), target=target)


def vector_bits_of(target) -> int:
    """fp32 vector width (bits) to use for a CPU target: 512 when LLVM's features of the target (its ``mcpu`` after
    its ``mattr`` edits) include AVX-512F, else 256."""
    from .cpu import target_features

    return 512 if "avx512f" in target_features(target) else 256


def rows_cols(shape) -> tuple[int, int]:
    """Flatten a static shape to (rows, last-axis length)."""
    cols = int(shape[-1])
    rows = int(math.prod(int(s) for s in shape[:-1])) if len(shape) > 1 else 1
    return rows, cols
