"""Fused softmax attention for CPU targets: one hand-written TIR kernel for ``softmax(Q·Kᵀ·scale + mask)·V``.

Layout (float32, static shapes): ``Q (BH, N, D)``, ``Kt (BH, D, M)`` (keys already transposed, as the score matmul's
right operand) or, with ``k_rows``, ``K (BH, M, D)`` (transposed while it is packed, below), ``V (BH, M, DV)``, an
optional additive mask read through static strides (broadcast dims stride 0, so a ``(1, 1, N, M)`` causal mask or a
``(B, 1, 1, M)`` padding mask is never expanded), output ``O (BH, N, DV)`` or, with ``out_lead``, ``O (*out_lead, N,
DV)`` (the caller's shape, same memory order: the graph needs no reshape copy of the output).

Structure (flash attention with an online softmax): first ``Kt`` is packed once per call into contiguous
``D x TJ`` panels, one per score tile of ``TJ = NJ·V`` keys (``Kt`` rows are ``M`` floats apart: at a power-of-two
``M`` an unpacked panel's lines share L1 sets), shared by every query block of the head.  The parallel tasks are
(head, block of :data:`QUERY_BLOCK` query rows) pairs (the last block walks only its rows, rounded up to whole
register tiles).  A task walks the keys in blocks of :data:`KEY_BLOCK` (rounded down to whole score tiles; the last
block shorter) and per block, strip by strip of ``lcm(MI, MI3)`` rows (the register tiles' rows, 6 by default), so
that the strip's scores stay in L1 between the three steps:

1. the strip's scores into a per-task scratch: register tiles of ``MI`` rows x ``NJ`` vectors of keys,
   fma outer products over ``D`` (a broadcast ``Q`` element times a packed ``Kt`` vector); scale and mask are
   applied as the tile is stored, and the rows' block max is kept lane-wise in the same epilogue (no max pass over
   the scores; keys past the last whole tile: a scalar loop);
2. per row: the block max (one horizontal reduction), the new running max, ``exp(x - max)`` with the polynomial of
   :mod:`targets.softmax_kernels` stored and summed (its exp pass), the running sum and output row rescaled by
   ``exp(old max - new max)``;
3. accumulates ``P·V`` into the strip's output rows in register tiles (``MI`` rows x the value width) over the
   block's rows of ``V``;

and finally writes ``O = acc / sum``.  No score or probability tensor ever reaches memory (the unfused graph writes
and reads ``BH·N·M`` floats three times); the packed ``Kt`` is a workspace of about the size of ``Kt``.  Any
``N``, ``M``: rows past ``N`` in the last query block (up to its last register tile) recompute row ``N - 1`` and are
never stored.

Numerics as the unfused path: ``exp(x - max) = 0`` where ``x - max < -87`` (``-inf`` / ``finfo.min`` masked logits
never give NaN); a fully masked row (every exp flushed, sum 0) gives the uniform distribution, i.e. the mean of V,
exactly as the routed softmax kernel does.  All indices are int32 (the pattern checks the sizes).

:func:`make_symbolic_attention_kernel` builds the same kernel with ``BH``, ``N`` and ``M`` bound at run time (int64
indices): full key blocks run the static block code, the last one is padded to whole score tiles with ``-inf``.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from . import _env  # noqa: F401  (sets TVM_NUM_THREADS before tvm is imported)
import tvm
from tvm.script import tirx as T

from .softmax_kernels import _hreduce, exp_nonpos, row_softmax_macros

log = logging.getLogger(__name__)

_F32 = "float32"
#: Keys per block (rounded down to whole score tiles): a strip's scores (6 x KEY_BLOCK floats) stay in L1, the
#: block's packed Kt panels and V rows (64 KiB each at d = 64) in L2; one online-softmax rescale per block.
KEY_BLOCK = 256
#: Query rows per task (rounded to the 6-row register tile): more rows keep a block's K/V panels in L2 for longer,
#: fewer give more tasks to the threads.
QUERY_BLOCK = 48


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
    (16 AVX-512, 8 AVX2); ``out_lead`` the output's leading dims (product ``bh``; None: ``(bh,)``); ``k_rows``: the
    key operand is ``K (bh, m, d)`` instead of ``Kt (bh, d, m)`` (bit-identical results)."""

    bh: int
    n: int
    m: int
    d: int
    dv: int
    lanes: int
    scale: float = 1.0
    mask: MaskLayout | None = None
    out_lead: tuple | None = None
    k_rows: bool = False


@dataclasses.dataclass(frozen=True)
class SymbolicMask:
    """An additive float32 mask of a run-time-shaped problem (:func:`make_symbolic_attention_kernel`), passed as a
    ``(G, R, C)`` buffer: ``G`` the product of the mask's non-broadcast leading dims (run time), ``R`` = ``N`` when
    ``row_full`` else 1, ``C`` = ``M`` when ``col_full`` else 1.

    groups: the head -> group map, ``g(bh) = sum((bh // after) % extent * stride)`` over ``(after, extent, stride)``
    triples, static ints (``extent`` None for the outermost leading dim, whose run-time extent never needs a modulo:
    ``bh < BH``), one per non-broadcast leading dim of the mask; empty = one group shared by every head.
    """

    groups: tuple
    row_full: bool
    col_full: bool


@dataclasses.dataclass(frozen=True)
class SymbolicAttention:
    """A fused attention problem whose batch·heads ``BH``, query length ``N`` and key length ``M`` are known only at
    run time (bound from the arguments' shapes); head dim ``d``, value dim ``dv``, ``lanes``, ``scale``, ``k_rows`` as
    in :class:`AttentionShape`; ``mask`` a :class:`SymbolicMask` or None; ``out_lead`` the output's static leading
    dims after its run-time first one (None: output ``(BH, N, DV)``)."""

    d: int
    dv: int
    lanes: int
    scale: float = 1.0
    mask: SymbolicMask | None = None
    out_lead: tuple | None = None
    k_rows: bool = False


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
    if s.out_lead is not None and math.prod(s.out_lead) != s.bh:
        return f"output leading dims {s.out_lead} do not multiply to {s.bh} heads"
    return None


def _unroll(length: int, lanes: int) -> int:
    u = 4
    while u > 1 and length < 2 * u * lanes:
        u //= 2
    return u


def _geometry(s, query_block: int | None = None, tiles: tuple | None = None) -> dict:
    V = s.lanes
    MI = 6
    NJ = 4 if V == 16 else 2  # score tile: 6 x 64 (zmm: 24 accumulators) or 6 x 16 (ymm: 12)
    V3 = value_lanes(s.dv, V)
    NJ3 = max(1, min(s.dv // V3, 64 // V3 if V == 16 else 16 // V3))
    MI3 = MI
    if tiles:
        MI, NJ, MI3, NJ3 = tiles
    step = MI * MI3 // math.gcd(MI, MI3)  # query blocks hold whole row tiles of both products
    bq = query_block or QUERY_BLOCK
    bk = max(KEY_BLOCK // (NJ * V), 1) * NJ * V  # whole score tiles: block starts are tile starts of the packed Kt
    if isinstance(s, SymbolicAttention):  # lengths known at run time: full-size blocks
        return {"V": V, "MI": MI, "NJ": NJ, "V3": V3, "NJ3": NJ3, "MI3": MI3, "BQ": max(step, bq) // step * step,
                "BK": bk}
    bq = max(step, min(bq, -(-s.n // step) * step)) // step * step
    return {"V": V, "MI": MI, "NJ": NJ, "V3": V3, "NJ3": NJ3, "MI3": MI3, "BQ": bq, "BK": min(bk, s.m)}


def make_attention_kernel(s: AttentionShape, query_block: int | None = None,
                          tiles: tuple | None = None) -> tvm.tirx.PrimFunc:
    """Destination-passing PrimFunc ``f(Q, Kt, V, [MASK,] O)`` (shapes in the module docstring; ``MASK`` flat, only
    when ``s.mask``), already scheduled and opaque to fusion.  ``query_block``: query rows per task (default
    :data:`QUERY_BLOCK`, rounded to the register tiles); ``tiles``: ``(MI, NJ, MI3, NJ3)`` register tiles (rows x
    vectors) of the score and P·V products instead of the per-ISA defaults (for measurements).  ValueError when
    :func:`supported` says no."""
    why = supported(s)
    if why:
        raise ValueError(f"fused attention kernel cannot take {s}: {why}")
    return _build(s, query_block, tiles)


def make_symbolic_attention_kernel(s: SymbolicAttention, query_block: int | None = None,
                                   tiles: tuple | None = None) -> tvm.tirx.PrimFunc:
    """The fused kernel with ``BH``, ``N`` and ``M`` bound at run time from the arguments' shapes (int64 indexing):
    ``f(Q (BH, N, D), Kt (BH, D, M), V (BH, M, DV), [MASK (G, R, C),] O (BH, N, DV))``, ``MASK`` as
    :class:`SymbolicMask` says.  One compiled function serves every batch and length.

    Same tiles and numerics as :func:`make_attention_kernel`; what differs: the last query block's rows past ``N``
    recompute row ``N - 1`` (clamped reads, only the write-back guarded, as before); the key blocks are
    ``ceil(M / KEY_BLOCK)`` at run time, the full ones run the static block code, the last one (``1..KEY_BLOCK``
    keys) walks ``ceil(keys / TJ)`` score tiles whose keys past ``M`` read key ``M - 1`` (clamped, packed by a scalar
    loop) and are stored as ``-inf`` (exp 0 after any running max), and its row softmax runs over that padded length
    with run-time loop counts; P·V of the last block reads only the true keys.  ``M = 0`` gives zeros.  ValueError
    when the value width is not a multiple of 4."""
    if min(s.d, s.dv) < 1 or value_lanes(s.dv, s.lanes) is None:
        raise ValueError(f"fused attention kernel cannot take {s}: value width {s.dv} is not a multiple of 4")
    return _build(s, query_block, tiles)


def _build(s, query_block: int | None, tiles: tuple | None) -> tvm.tirx.PrimFunc:
    """The kernel of :func:`make_attention_kernel` (``s`` an :class:`AttentionShape`: static extents, int32
    indexing) or of :func:`make_symbolic_attention_kernel` (``s`` a :class:`SymbolicAttention`)."""
    sym = isinstance(s, SymbolicAttention)
    g = _geometry(s, query_block, tiles)
    V, MI, NJ, V3, NJ3, MI3, BQ, BK = (g[k] for k in ("V", "MI", "NJ", "V3", "NJ3", "MI3", "BQ", "BK"))
    if sym:
        BH, N, M = (tvm.tirx.Var(x, "int64") for x in ("bh", "n", "m"))
        D, DV = s.d, s.dv
    else:
        BH, N, M, D, DV = s.bh, s.n, s.m, s.d, s.dv
    TJ = NJ * V  # keys per score tile
    TC = NJ3 * V3  # value columns per P·V tile
    NCT = DV // TC
    CT = DV - NCT * TC  # tail value columns (a multiple of V3), own tile
    NQB = (N + BQ - 1) // BQ if sym else -(-N // BQ)
    NT = BH * NQB
    if sym:
        NKB = (M - 1) // BK  # full key blocks before the last one (which holds 1..BK keys when M >= 1)
        KL = M - NKB * BK  # keys of the last block
        KT = None
    else:
        NKB = M // BK  # full key blocks
        KT = M - NKB * BK  # keys of the last, shorter block
    SP = BK + V  # score row stride: padded so that it is never a power of two (L1 set conflicts)
    UMAX = _unroll(BK, V)
    SS = 2 * UMAX  # result row of the softmax accumulators
    full = row_softmax_macros(BK, _unroll(BK, V), V, SS)
    if sym:  # the last block's row softmax runs over its keys padded to whole score tiles (pads are -inf)
        tail = row_softmax_macros((KL + TJ - 1) // TJ * TJ, UMAX, V, SS)
    else:
        tail = row_softmax_macros(KT, _unroll(KT, V), V, SS) if KT else full
    floor = T.float32(-3.0e38)  # the row macros' max floor: a fully masked row keeps it
    scale = T.float32(s.scale)
    mask = s.mask
    # a fully masked row is the mean of V (M = 0: zeros)
    inv_m = T.float32(1.0) / T.Cast(_F32, T.max(M, 1)) if sym else T.float32(1.0 / M)

    step = MI * MI3 // math.gcd(MI, MI3)
    kshape = (BH, M, D) if s.k_rows else (BH, D, M)

    def kread(K, bh, k, j):
        """Element (k, j) of head ``bh``'s Kᵀ (``K`` given as keys x D rows when ``s.k_rows``)."""
        return K[bh, j, k] if s.k_rows else K[bh, k, j]

    def rows(task):
        """Rows a task walks: its rows before N rounded up to whole register tiles (BQ but in the last block)."""
        if not sym:
            last = -(-(N - (NQB - 1) * BQ) // step) * step
            return BQ if last == BQ else T.Select(task % NQB == NQB - 1, last, BQ)
        return T.min(BQ, (N - (task % NQB) * BQ + step - 1) // step * step)

    def qrow(task, i):
        return T.min((task % NQB) * BQ + i, N - 1)  # rows past N (last block) recompute row N-1, never stored

    def mask_at(MASK, task, row, col):
        lead = task // NQB
        if sym:
            grp = 0
            for after, extent, stride in mask.groups:
                part = lead // after if after != 1 else lead
                part = part % extent if extent is not None else part
                grp = grp + (part * stride if stride != 1 else part)
            return MASK[grp, row if mask.row_full else 0, col if mask.col_full else 0]
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

    def tile_macro(padded: bool):
        """Score tile ``jb`` of the block at ``k0``: pack its ``D x TJ`` panel of Kt, ``S[:, jb*TJ:(jb+1)*TJ]`` =
        finished products.  ``padded``: keys at or past ``M`` are read clamped and stored as ``-inf``."""
        minus_inf = T.float32(float("-inf"))

        @T.macro
        def tile(Q, Kp, MASK, S, mx, acc, task, k0, jb, r0, nr):
            # rows r0 .. r0 + nr of the task, S / mx rows 0 .. nr
            for ib in range(nr // MI):
                for i in T.unroll(MI):
                    for jj in T.unroll(NJ):
                        for l in T.vectorized(V):
                            acc[i, jj * V + l] = T.float32(0.0)
                for k in range(D):
                    for i in T.unroll(MI):
                        for jj in T.unroll(NJ):
                            for l in T.vectorized(V):
                                acc[i, jj * V + l] = T.fma(Q[task // NQB, qrow(task, r0 + ib * MI + i), k],
                                                           Kp[task // NQB, k0 // TJ + jb, k, jj * V + l],
                                                           acc[i, jj * V + l])
                for i in T.unroll(MI):
                    for jj in T.unroll(NJ):
                        for l in T.vectorized(V):
                            if padded:
                                S[ib * MI + i, jb * TJ + jj * V + l] = T.Select(
                                    k0 + jb * TJ + jj * V + l < M,
                                    finish(MASK, task, r0 + ib * MI + i, T.min(k0 + jb * TJ + jj * V + l, M - 1),
                                           acc[i, jj * V + l]),
                                    minus_inf)
                            else:
                                S[ib * MI + i, jb * TJ + jj * V + l] = finish(
                                    MASK, task, r0 + ib * MI + i, k0 + jb * TJ + jj * V + l, acc[i, jj * V + l])
                    for jj in T.unroll(NJ):  # the rows' running block max, lane-wise (reduced per row later)
                        for l in T.vectorized(V):
                            mx[ib * MI + i, l] = T.max(mx[ib * MI + i, l], S[ib * MI + i, jb * TJ + jj * V + l])

        return tile

    tile_full = tile_macro(False)
    tile_padded = tile_macro(True) if sym else None

    def score_macro(L):
        NFT = L // TJ  # full score tiles
        LT = L - NFT * TJ  # tail keys (scalar loop)

        @T.macro
        def scores(Q, K, Kp, MASK, S, mx, acc, task, k0, r0, nr):
            # S[:, 0:L] = scale * Q[rows] @ Kt[:, k0:k0+L] + mask, key-tile-major; each D x TJ panel of Kt is first
            # packed contiguous (Kt rows are M floats apart: at a power-of-two M the panel's lines share L1 sets)
            for jb in range(NFT):
                tile_full(Q, Kp, MASK, S, mx, acc, task, k0, jb, r0, nr)
            for i in range(nr):
                for j in range(LT):
                    S[i, NFT * TJ + j] = T.float32(0.0)
                    for k in range(D):
                        S[i, NFT * TJ + j] = S[i, NFT * TJ + j] + Q[task // NQB, qrow(task, r0 + i), k] * \
                            kread(K, task // NQB, k, k0 + NFT * TJ + j)
                    S[i, NFT * TJ + j] = finish(MASK, task, r0 + i, k0 + NFT * TJ + j, S[i, NFT * TJ + j])

        return scores

    @T.macro
    def scores_last(Q, K, Kp, MASK, S, mx, acc, task, k0, r0, nr):
        # symbolic: the last block's M - k0 keys (1..BK) as whole tiles, the partial one padded with -inf
        for jb in range(KL // TJ):
            tile_full(Q, Kp, MASK, S, mx, acc, task, k0, jb, r0, nr)
        if KL % TJ > 0:
            tile_padded(Q, Kp, MASK, S, mx, acc, task, k0, KL // TJ, r0, nr)

    scores_full = score_macro(BK)
    if sym:
        scores_tail = scores_last
    else:
        scores_tail = score_macro(KT) if KT else scores_full

    @T.macro
    def pv_tile(Vb, S, OA, acc, task, k0, KL, c0, NJV, r0, nr):
        # OA[r0 + rows, c0 : c0 + NJV*V3] += P[rows, 0:KL] @ V[bh, k0 : k0 + KL, c0 : ...], rows 0 .. nr per MI3-row
        # register tile
        for ib in range(nr // MI3):
            for i in T.unroll(MI3):
                for jj in T.unroll(NJV):
                    for l in T.vectorized(V3):
                        acc[i, jj * V3 + l] = OA[r0 + ib * MI3 + i, c0 + jj * V3 + l]
            for kk in range(KL):
                for i in T.unroll(MI3):
                    for jj in T.unroll(NJV):
                        for l in T.vectorized(V3):
                            acc[i, jj * V3 + l] = T.fma(S[ib * MI3 + i, kk],
                                                        Vb[task // NQB, k0 + kk, c0 + jj * V3 + l],
                                                        acc[i, jj * V3 + l])
            for i in T.unroll(MI3):
                for jj in T.unroll(NJV):
                    for l in T.vectorized(V3):
                        OA[r0 + ib * MI3 + i, c0 + jj * V3 + l] = acc[i, jj * V3 + l]

    def block_macro(L, scores, macros):
        """One key block of ``L`` keys (P·V reads exactly these; ``scores``/``macros`` may pad the row)."""
        expstore = macros[1]
        LT = 0 if sym else L - L // TJ * TJ  # keys past the block's last whole score tile (static: scalar scores)

        @T.macro
        def part(Q, K, Kp, Vb, MASK, S, mx, OA, st, acc, sacc, task, k0, r0, nr):
            # rows r0 .. r0 + nr of the task (S / mx rows 0 .. nr): scores, online softmax, P·V
            for i in range(nr):
                for l in T.vectorized(V):
                    mx[i, l] = floor
            scores(Q, K, Kp, MASK, S, mx, acc, task, k0, r0, nr)
            for i in range(nr):
                # online softmax: new max, exps against it (stored, summed), rescale the running sum and output
                sacc[SS, 0] = _hreduce(mx[i, T.ramp(0, 1, V)], V, T.max)
                for j in T.unroll(LT):
                    sacc[SS, 0] = T.max(sacc[SS, 0], S[i, L - LT + j])
                sacc[SS, 2] = T.max(st[r0 + i, 0], sacc[SS, 0])
                expstore(S, S, sacc, i, 0, sacc[SS, 2])
                sacc[SS, 3] = exp_nonpos(st[r0 + i, 0] - sacc[SS, 2])
                st[r0 + i, 1] = st[r0 + i, 1] * sacc[SS, 3] + sacc[SS, 1]
                st[r0 + i, 0] = sacc[SS, 2]
                for c in T.vectorized(DV):
                    OA[r0 + i, c] = OA[r0 + i, c] * sacc[SS, 3]
            for cb in range(NCT):
                pv_tile(Vb, S, OA, acc, task, k0, L, cb * TC, NJ3, r0, nr)
            if CT > 0:
                pv_tile(Vb, S, OA, acc, task, k0, L, NCT * TC, CT // V3, r0, nr)

        @T.macro
        def block(Q, K, Kp, Vb, MASK, S, mx, OA, st, acc, sacc, task, k0):
            for sb in range(rows(task) // step):  # strips of register-tile rows: their scores stay in L1
                part(Q, K, Kp, Vb, MASK, S, mx, OA, st, acc, sacc, task, k0, sb * step, step)

        return block

    block_full = block_macro(BK, scores_full, full)
    if sym:
        block_tail = block_macro(KL, scores_tail, tail)
        has_tail = M > 0
    else:
        block_tail = block_macro(KT, scores_tail, tail) if KT else block_full
        has_tail = KT > 0

    if sym:
        NTF = M // TJ  # whole score tiles of keys
        NTP = T.max((M + TJ - 1) // TJ, 1)  # packed tiles (the last one padded with key M - 1)
    else:
        NTF = M // TJ
        NTP = max(NTF, 1)  # keys past the last whole tile are read from Kt by the scalar score loop

    @T.macro
    def body(Q, K, Vb, MASK, OUT):
        O = T.decl_buffer((BH, N, DV), _F32, data=OUT.data)  # the output in the caller's shape, seen as (BH, N, DV)
        # Kt packed once into D x TJ panels, one per score tile (contiguous: the unpacked panel's rows are M floats
        # apart and share L1 sets at a power-of-two M), shared by every query block of the head
        Kp = T.alloc_buffer((BH, NTP, D, TJ), _F32)
        if sym:
            for t in T.parallel(BH * NTP):
                if t % NTP < NTF and s.k_rows:  # key rows: walk K contiguously (see the static branch)
                    for l in range(TJ):
                        for k in range(D):
                            Kp[t // NTP, t % NTP, k, l] = K[t // NTP, t % NTP * TJ + l, k]
                elif t % NTP < NTF:
                    for k in range(D):
                        for l in T.vectorized(TJ):
                            Kp[t // NTP, t % NTP, k, l] = kread(K, t // NTP, k, t % NTP * TJ + l)
                else:
                    for k in range(D):
                        for l in range(TJ):
                            Kp[t // NTP, t % NTP, k, l] = kread(K, t // NTP, k, T.min(t % NTP * TJ + l, M - 1))
        elif NTF > 0 and s.k_rows:
            # key rows: a key's D floats read contiguously, stored D x TJ; measured at parity with packing Kt (BH = 8,
            # N = 1024), where the Kt loop order (a vectorized gather of K) was up to 0.3 ms slower
            for t in T.parallel(BH * NTF):
                for l in range(TJ):
                    for k in range(D):
                        Kp[t // NTF, t % NTF, k, l] = K[t // NTF, t % NTF * TJ + l, k]
        elif NTF > 0:
            for t in T.parallel(BH * NTF):
                for k in range(D):
                    for l in T.vectorized(TJ):
                        Kp[t // NTF, t % NTF, k, l] = kread(K, t // NTF, k, t % NTF * TJ + l)
        for task in T.parallel(NT):
            S = T.alloc_buffer((step, SP), _F32)  # probabilities of one key block
            mx = T.alloc_buffer((step, V), _F32)  # per row: lane-wise max of the block's scores
            OA = T.alloc_buffer((BQ, DV), _F32)  # unnormalized output rows
            st = T.alloc_buffer((BQ, 2), _F32)  # per row: running max, running sum
            acc = T.alloc_buffer((max(MI, MI3), max(TJ, TC)), _F32, scope="local")
            sacc = T.alloc_buffer((2 * UMAX + 1, V), _F32, scope="local")
            for i in range(BQ):
                st[i, 0] = floor
                st[i, 1] = T.float32(0.0)
                for c in T.vectorized(DV):
                    OA[i, c] = T.float32(0.0)
            for kb in range(NKB):
                block_full(Q, K, Kp, Vb, MASK, S, mx, OA, st, acc, sacc, task, kb * BK)
            if has_tail:
                block_tail(Q, K, Kp, Vb, MASK, S, mx, OA, st, acc, sacc, task, NKB * BK)
            for i in range(BQ):
                if (task % NQB) * BQ + i < N:
                    if st[i, 1] > T.float32(0.0):
                        for c in T.vectorized(DV):
                            O[task // NQB, (task % NQB) * BQ + i, c] = OA[i, c] * (T.float32(1.0) / st[i, 1])
                    else:
                        # every exp flushed (fully masked row): uniform probabilities, the mean of V (as unfused)
                        for c in T.vectorized(DV):
                            OA[i, c] = T.float32(0.0)
                        for k in range(M):
                            for c in T.vectorized(DV):
                                OA[i, c] = OA[i, c] + Vb[task // NQB, k, c]
                        for c in T.vectorized(DV):
                            O[task // NQB, (task % NQB) * BQ + i, c] = OA[i, c] * inv_m

    attrs = {"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True}
    if sym:
        oshape = (BH, N, DV) if s.out_lead is None else \
            (tvm.tirx.Var("out_lead", "int64"),) + tuple(s.out_lead) + (N, DV)
    else:
        oshape = (BH, N, DV) if s.out_lead is None else tuple(s.out_lead) + (N, DV)
    if sym and mask:
        mshape = (tvm.tirx.Var("mask_groups", "int64"), N if mask.row_full else 1, M if mask.col_full else 1)

        @T.prim_func(s_tir=True)
        def kernel_sym_mask(q: T.handle, kt: T.handle, v: T.handle, mk: T.handle, o: T.handle):
            T.func_attr(attrs)
            Q = T.match_buffer(q, (BH, N, D), _F32)
            K = T.match_buffer(kt, kshape, _F32)
            Vb = T.match_buffer(v, (BH, M, DV), _F32)
            MASK = T.match_buffer(mk, mshape, _F32)
            O = T.match_buffer(o, oshape, _F32)
            with T.sblock("root"):
                body(Q, K, Vb, MASK, O)

        f = kernel_sym_mask
    elif sym:
        @T.prim_func(s_tir=True)
        def kernel_sym(q: T.handle, kt: T.handle, v: T.handle, o: T.handle):
            T.func_attr(attrs)
            Q = T.match_buffer(q, (BH, N, D), _F32)
            K = T.match_buffer(kt, kshape, _F32)
            Vb = T.match_buffer(v, (BH, M, DV), _F32)
            O = T.match_buffer(o, oshape, _F32)
            with T.sblock("root"):
                body(Q, K, Vb, None, O)

        f = kernel_sym
    elif mask:
        @T.prim_func(s_tir=True)
        def kernel_mask(Q: T.Buffer((BH, N, D), _F32), K: T.Buffer(kshape, _F32), Vb: T.Buffer((BH, M, DV), _F32),
                        MASK: T.Buffer((mask.size,), _F32), O: T.Buffer(oshape, _F32)):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
            with T.sblock("root"):
                body(Q, K, Vb, MASK, O)

        f = kernel_mask
    else:
        @T.prim_func(s_tir=True)
        def kernel(Q: T.Buffer((BH, N, D), _F32), K: T.Buffer(kshape, _F32), Vb: T.Buffer((BH, M, DV), _F32),
                   O: T.Buffer(oshape, _F32)):
            T.func_attr({"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True})
            with T.sblock("root"):
                body(Q, K, Vb, None, O)

        f = kernel
    log.debug("fused attention kernel %s, geometry %s", s, g)
    return f


def build_attention_library(s, target, name: str = "attention", query_block: int | None = None,
                            tiles: tuple | None = None):
    """Compile one kernel alone (static :class:`AttentionShape` or run-time :class:`SymbolicAttention`) into a
    runtime module with a single function ``name`` (destination passing)."""
    make = make_symbolic_attention_kernel if isinstance(s, SymbolicAttention) else make_attention_kernel
    f = make(s, query_block, tiles).with_attr("global_symbol", name)
    return tvm.compile(tvm.IRModule({name: f}), target=target)
