"""Fused softmax attention for CPU targets: one hand-written TIR kernel for ``softmax(Q·Kᵀ·scale + mask)·V``.

Layout (float32, static shapes): ``Q (BH, N, D)``, ``Kt (BH, D, M)`` (keys already transposed, as the score matmul's
right operand), ``V (BH, M, DV)``, an optional additive mask read through static strides (broadcast dims stride 0,
so a ``(1, 1, N, M)`` causal mask or a ``(B, 1, 1, M)`` padding mask is never expanded), output ``O (BH, N, DV)``.

Structure ("row-block" flash attention): the parallel tasks are (head, block of ``BQ`` query rows) pairs.  A task

1. computes its ``BQ x M`` score block into a per-task scratch that stays in L2 (``BQ`` is chosen so the block is
   at most :data:`SCORE_BLOCK_BYTES`): register tiles of ``MI`` rows x ``NJ`` vectors of keys, outer products over
   ``D`` (a broadcast ``Q`` element times a contiguous ``Kt`` vector, fma), key-panel-major so a ``D x NJ·V`` panel
   of ``Kt`` stays in L1 while every row tile of the block uses it; scale and mask are applied as the tile is stored;
2. runs the project's three-pass row softmax on each score row in place (the macros of
   :mod:`targets.softmax_kernels`: max, ``exp(x - max)`` with the same polynomial, stored and summed; the 1/sum is
   applied to the output rows, not to the probabilities);
3. accumulates ``P·V`` in register tiles (``MI`` rows x the value width) over key blocks of :data:`KEY_BLOCK` rows
   of ``V`` (L2-resident), then writes ``O = acc / sum``.

No score or probability tensor ever reaches memory (the unfused graph writes and reads ``BH·N·M`` floats three
times).  The exact row max is known before any exp, so no online rescaling is needed; the limit is the score block
(``BQ`` shrinks as ``M`` grows, to ``MI`` rows at ``M`` ~ 5K and beyond, still correct, slower).

Numerics as the unfused path: ``exp(x - max) = 0`` where ``x - max < -87`` (``-inf`` / ``finfo.min`` masked logits
never give NaN); a fully masked row (every exp flushed, sum 0) gives the uniform distribution, i.e. the mean of V,
exactly as the routed softmax kernel does.  All indices are int32 (the pattern checks the sizes).
"""

from __future__ import annotations

import dataclasses
import logging

from . import _env  # noqa: F401  (sets TVM_NUM_THREADS before tvm is imported)
import tvm
from tvm.script import tirx as T

from .softmax_kernels import row_softmax_macros

log = logging.getLogger(__name__)

_F32 = "float32"
#: Per-task score block budget (bytes): the block plus the running K/V panels stay in a 1 MiB L2 (Zen 4; Intel
#: server cores have 1-2 MiB).
SCORE_BLOCK_BYTES = 256 << 10
#: Rows of V accumulated per pass over a row tile of the P·V product (a 64-wide V block: 64 KiB, L2).
KEY_BLOCK = 256
#: Most query rows per task (more rows amortize the K/V reads; fewer give more tasks for the threads).
MAX_QUERY_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class MaskLayout:
    """Where element ``(lead..., i, j)`` of an additive float32 mask lives in its flat buffer.

    lead_dims: the score tensor's leading (batch, head, ...) extents, whose product is BH; lead_strides: the mask's
    stride (elements) along each of them (0 = broadcast); row_stride / col_stride: along queries / keys; size: the
    mask's element count.
    """

    lead_dims: tuple
    lead_strides: tuple
    row_stride: int
    col_stride: int
    size: int


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """A fused attention problem: ``BH`` heads, ``N`` queries, ``M`` keys, head dim ``D``, value dim ``DV``;
    ``scale`` multiplies the scores (1.0 = none); ``mask`` an additive mask or None; ``lanes`` the fp32 vector width
    (16 AVX-512, 8 AVX2)."""

    bh: int
    n: int
    m: int
    d: int
    dv: int
    lanes: int
    scale: float = 1.0
    mask: MaskLayout | None = None


def value_lanes(dv: int, lanes: int) -> int | None:
    """Vector width for the P·V tiles: ``lanes`` if it divides ``dv``, else 8 or 4 if they do, else None."""
    for v in (lanes, 8, 4):
        if v <= lanes and dv % v == 0:
            return v
    return None


def supported(s: AttentionShape) -> str | None:
    """None when :func:`make_attention_kernel` can build ``s``, else the reason (for the pattern's log)."""
    if min(s.bh, s.n, s.m, s.d, s.dv) < 1:
        return "empty extent"
    if value_lanes(s.dv, s.lanes) is None:
        return f"value width {s.dv} is not a multiple of 4"
    biggest = max(s.bh * s.n * max(s.d, s.dv), s.bh * s.m * max(s.d, s.dv), s.mask.size if s.mask else 0)
    if biggest >= 1 << 31:
        return "operands beyond int32 indexing"
    return None


def _geometry(s: AttentionShape) -> dict:
    V = s.lanes
    MI = 6
    NJ = 4 if V == 16 else 2  # score tile: 6 x 64 (zmm: 24 accumulators) or 6 x 16 (ymm: 12)
    V3 = value_lanes(s.dv, V)
    NJ3 = max(1, min(s.dv // V3, 64 // V3 if V == 16 else 16 // V3))
    MP = -(-s.m // V) * V + V  # score row stride: padded, and never a power of two (L1 set conflicts)
    bq = SCORE_BLOCK_BYTES // (4 * MP)
    bq = max(MI, min(MAX_QUERY_BLOCK, bq, -(-s.n // MI) * MI))
    bq = bq // MI * MI
    U = 4
    while U > 1 and s.m < 2 * U * V:
        U //= 2
    return {"V": V, "MI": MI, "NJ": NJ, "V3": V3, "NJ3": NJ3, "MP": MP, "BQ": bq, "U": U}


def make_attention_kernel(s: AttentionShape) -> tvm.tirx.PrimFunc:
    """Destination-passing PrimFunc ``f(Q, Kt, V, [MASK,] O)`` (shapes in the module docstring; ``MASK`` flat, only
    when ``s.mask``), already scheduled and opaque to fusion.  ValueError when :func:`supported` says no."""
    why = supported(s)
    if why:
        raise ValueError(f"fused attention kernel cannot take {s}: {why}")
    g = _geometry(s)
    V, MI, NJ, V3, NJ3, MP, BQ, U = (g[k] for k in ("V", "MI", "NJ", "V3", "NJ3", "MP", "BQ", "U"))
    BH, N, M, D, DV = s.bh, s.n, s.m, s.d, s.dv
    TJ = NJ * V  # keys per score tile
    NFT = M // TJ  # full score tiles per row
    MT = M - NFT * TJ  # tail keys (scalar loop)
    TC = NJ3 * V3  # value columns per P·V tile
    NCT = DV // TC
    CT = DV - NCT * TC  # tail value columns (a multiple of V3), own tile
    NQB = -(-N // BQ)
    NT = BH * NQB
    NKB = M // KEY_BLOCK
    KT = M - NKB * KEY_BLOCK
    SS = 2 * U
    rowmax, expstore, _scale, fill = row_softmax_macros(M, U, V, SS)
    uniform = T.float32(1.0 / M)
    scale = T.float32(s.scale)
    mask = s.mask

    def qrow(task, i):
        return T.min((task % NQB) * BQ + i, N - 1)  # rows past N (last block) recompute row N-1, never stored

    def mask_at(MASK, task, row, col):
        lead = task // NQB
        idx = row * mask.row_stride + col * mask.col_stride
        rest = BH
        for dim, stride in zip(mask.lead_dims, mask.lead_strides):
            rest //= dim
            if stride:
                idx = idx + (lead // rest) % dim * stride
        return MASK[idx]

    def finish(MASK, task, i, col, value):
        v = value * scale if s.scale != 1.0 else value
        return v + mask_at(MASK, task, qrow(task, i), col) if mask else v

    @T.macro
    def scores(Q, K, MASK, S, acc, task):
        for jb in range(NFT):
            for ib in range(BQ // MI):
                for i in T.unroll(MI):
                    for jj in T.unroll(NJ):
                        for l in T.vectorized(V):
                            acc[i, jj * V + l] = T.float32(0.0)
                for k in range(D):
                    for i in T.unroll(MI):
                        for jj in T.unroll(NJ):
                            for l in T.vectorized(V):
                                acc[i, jj * V + l] = T.fma(Q[task // NQB, qrow(task, ib * MI + i), k],
                                                           K[task // NQB, k, jb * TJ + jj * V + l],
                                                           acc[i, jj * V + l])
                for i in T.unroll(MI):
                    for jj in T.unroll(NJ):
                        for l in T.vectorized(V):
                            S[ib * MI + i, jb * TJ + jj * V + l] = finish(MASK, task, ib * MI + i,
                                                                          jb * TJ + jj * V + l, acc[i, jj * V + l])
        for i in range(BQ):
            for j in range(MT):
                S[i, NFT * TJ + j] = T.float32(0.0)
                for k in range(D):
                    S[i, NFT * TJ + j] = S[i, NFT * TJ + j] + Q[task // NQB, qrow(task, i), k] * \
                        K[task // NQB, k, NFT * TJ + j]
                S[i, NFT * TJ + j] = finish(MASK, task, i, NFT * TJ + j, S[i, NFT * TJ + j])

    @T.macro
    def pv_tile(Vb, S, OA, acc, task, k0, KL, c0, NJV):
        # OA[rows, c0 : c0 + NJV*V3] += S[rows, k0 : k0 + KL] @ Vb[bh, k0 : k0 + KL, c0 : ...], per MI-row tile
        for ib in range(BQ // MI):
            for i in T.unroll(MI):
                for jj in T.unroll(NJV):
                    for l in T.vectorized(V3):
                        acc[i, jj * V3 + l] = OA[ib * MI + i, c0 + jj * V3 + l]
            for kk in range(KL):
                for i in T.unroll(MI):
                    for jj in T.unroll(NJV):
                        for l in T.vectorized(V3):
                            acc[i, jj * V3 + l] = T.fma(S[ib * MI + i, k0 + kk],
                                                        Vb[task // NQB, k0 + kk, c0 + jj * V3 + l],
                                                        acc[i, jj * V3 + l])
            for i in T.unroll(MI):
                for jj in T.unroll(NJV):
                    for l in T.vectorized(V3):
                        OA[ib * MI + i, c0 + jj * V3 + l] = acc[i, jj * V3 + l]

    @T.macro
    def pv_block(Vb, S, OA, acc, task, k0, KL):
        for cb in range(NCT):
            pv_tile(Vb, S, OA, acc, task, k0, KL, cb * TC, NJ3)
        if CT > 0:
            pv_tile(Vb, S, OA, acc, task, k0, KL, NCT * TC, CT // V3)

    @T.macro
    def body(Q, K, Vb, MASK, O):
        for task in T.parallel(NT):
            S = T.alloc_buffer((BQ, MP), _F32)
            OA = T.alloc_buffer((BQ, DV), _F32)
            inv = T.alloc_buffer((BQ,), _F32)
            acc = T.alloc_buffer((MI, max(TJ, TC)), _F32, scope="local")
            sacc = T.alloc_buffer((2 * U + 1, V), _F32, scope="local")
            scores(Q, K, MASK, S, acc, task)
            for i in range(BQ):
                rowmax(S, sacc, i, 0)
                expstore(S, S, sacc, i, 0, sacc[SS, 0])
                if sacc[SS, 1] > T.float32(0.0):
                    inv[i] = T.float32(1.0) / sacc[SS, 1]
                else:
                    fill(S, i, 0, uniform)
                    inv[i] = T.float32(1.0)
                for c in T.vectorized(DV):
                    OA[i, c] = T.float32(0.0)
            for kb in range(NKB):
                pv_block(Vb, S, OA, acc, task, kb * KEY_BLOCK, KEY_BLOCK)
            if KT > 0:
                pv_block(Vb, S, OA, acc, task, NKB * KEY_BLOCK, KT)
            for i in range(BQ):
                if (task % NQB) * BQ + i < N:
                    for c in T.vectorized(DV):
                        O[task // NQB, (task % NQB) * BQ + i, c] = OA[i, c] * inv[i]

    if mask:
        @T.prim_func(s_tir=True)
        def kernel_mask(Q: T.Buffer((BH, N, D), _F32), K: T.Buffer((BH, D, M), _F32), Vb: T.Buffer((BH, M, DV), _F32),
                        MASK: T.Buffer((mask.size,), _F32), O: T.Buffer((BH, N, DV), _F32)):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
            with T.sblock("root"):
                body(Q, K, Vb, MASK, O)

        f = kernel_mask
    else:
        @T.prim_func(s_tir=True)
        def kernel(Q: T.Buffer((BH, N, D), _F32), K: T.Buffer((BH, D, M), _F32), Vb: T.Buffer((BH, M, DV), _F32),
                   O: T.Buffer((BH, N, DV), _F32)):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
            with T.sblock("root"):
                body(Q, K, Vb, None, O)

        f = kernel
    log.debug("fused attention kernel %s, geometry %s", s, g)
    return f


def build_attention_library(s: AttentionShape, target, name: str = "attention"):
    """Compile one kernel alone into a runtime module with a single function ``name`` (destination passing)."""
    f = make_attention_kernel(s).with_attr("global_symbol", name)
    return tvm.compile(tvm.IRModule({name: f}), target=target)
