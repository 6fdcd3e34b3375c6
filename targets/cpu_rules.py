"""The project's dlight CPU schedule rules: matmul / batch-matmul, guarded reduction, injective, fallback.

Stock dlight has no CPU matmul rule (unscheduled matmuls run as naive serial loops, 1-2 GFLOP/s) and its
``cpu.Reduction`` is O(N^2) on single rows (the unit row loop is dropped and N becomes the parallel axis of a
nested reduction); ``cpu.GEMV`` hangs compilation and is never used here.  Rules, tried in order by
:func:`cpu_rules`:

1. :class:`MatmulRule` - one multiply-accumulate reduction block ``C[..., i, j] += A[..., i, k] * B[..., k, j]``
   (prologue/epilogue elementwise blocks fused): register tile ``MI x NJ`` (MI=4, NJ = 2 vectors), accumulators in
   ``local`` (on the stack where an extent is run-time), reduction loop outside the tile, vectorized column tile, unrolled row tile, epilogue per tile;
   parallel over batch x row tiles x column tiles, or, for K >= ``PACK_MIN_K``, over batch x column panels with B
   packed into a contiguous (K x NJ) panel per task that all row tiles reuse.  Long-K small-output matmuls
   (φ(K)ᵀV) get the K-split instead: partial sums over K chunks in parallel, then a vectorized sum (a run-time K:
   the ragged last chunk split off by LoopPartition).  A run-time row or column extent takes
   :func:`_apply_symbolic` (tile-padded domain, clamped operand reads, guarded write-back only; static columns
   with K >= ``PACK_MIN_K``: B packed into column panels as above; accumulator tiles on the stack, see
   :data:`SYMBOLIC_ACC_SCOPE`).
2. :class:`GuardedReduction` - ``dl.cpu.Reduction`` only where the fused leading spatial extent is > 1.
3. :class:`InjectiveRule` - elementwise / broadcast: all loops fused, split by the vector width and a parallel
   chunk; a block reading a transposed buffer gets 16 x 16 tiles instead (parallel over tiles, contiguous vector
   stores, gathers that stay in L1); run-time extents: only the static tail fused and vectorized, transposes tiled
   along their static axis (no division by a run-time extent per element).
4. :class:`FallbackRule` - anything else: the outermost spatial loop of every block is parallelized and the innermost
   spatial loop vectorized when it is a spatial loop of constant extent.

Functions below ``SMALL_WORK`` iterations are left serial (documented size threshold: parallel launch costs ~5 us).
"""

from __future__ import annotations

import logging

from . import _env  # noqa: F401
import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

log = logging.getLogger(__name__)

#: Loop nests with fewer iterations than this are not parallelized (launch overhead dominates).
SMALL_WORK = 4096
#: Reduction length from which B is packed into contiguous (K x NJ) panels (measured on the Intel AVX-512 host,
#: 1 thread: 1024x256x1024 105 -> 126 GFLOP/s packed; K=64 (q @ k^T) 86 -> 71 GFLOP/s, so not packed).
PACK_MIN_K = 128
#: ... and only while A (per batch) fits in L2, because panel-major order re-reads A once per column panel
#: (attention P @ V at N=4096, 64 MiB of P per head: 565 ms unpacked vs 857 ms packed).
PACK_MAX_A_BYTES = 1 << 20


def vector_lanes(target: Target, bits: int = 32) -> int:
    """Lanes of ``bits``-wide elements per vector register of a CPU target (16 fp32 on AVX-512, 8 on AVX2)."""
    from .softmax_kernels import vector_bits_of

    return max(vector_bits_of(target) // bits, 2)


def _const(x) -> int | None:
    return int(x) if isinstance(x, (int, tirx.IntImm)) else None


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    return _const(sch.get(loop).extent)


def _largest_divisor(n: int, candidates) -> int:
    for c in candidates:
        if c <= n and n % c == 0:
            return c
    return 1


#: Column tile (in vectors) a symbolic column extent is padded to a multiple of.
SYMBOLIC_COLUMN_VECTORS = 2
#: Most a padded matmul extent may grow (as a fraction) before the rule prefers the small divisor tile.
MAX_PAD_FRACTION = 0.25


def _padded_extents(ni: int, nj: int, lanes: int) -> tuple[int, int]:
    """(rows, columns) a matmul is computed at: unchanged where a row tile of 2-4 and a column tile of at least one
    vector divide them; otherwise rounded up to a multiple of 4 rows / one vector of columns when that adds at most
    :data:`MAX_PAD_FRACTION`."""
    cols = nj
    if nj >= 2 * lanes and _largest_divisor(nj, (2 * lanes, lanes)) < lanes:
        cols = -(-nj // lanes) * lanes
    rows = ni
    if ni >= 8 and _largest_divisor(ni, (4, 3, 2)) == 1:
        rows = -(-ni // 4) * 4
    if (cols - nj) / nj > MAX_PAD_FRACTION or (rows - ni) / ni > MAX_PAD_FRACTION:
        return ni, nj
    return rows, cols


def _flat_vector_loop(sch: s_tir.Schedule, block, lanes: int) -> None:
    """A copy block (pad or crop) as one fused loop, vectorized by ``lanes`` where it divides the innermost extent
    (else the innermost loop stays scalar) and parallel over the outer part when large."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner_ext = _extent(sch, loops[-1]) or 0
    if inner_ext % lanes == 0:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        outer, vec = sch.split(fused, factors=[None, lanes])
        sch.vectorize(vec)
    else:
        outer = sch.fuse(*loops[:-1]) if len(loops) > 1 else None
        if outer is None:
            return
    total = 1
    for lp in sch.get_loops(block):
        total *= _extent(sch, lp) or 1
    if total >= SMALL_WORK:
        sch.parallel(outer)


class MatmulRule(CPUScheduleRule):
    """Tiled, vectorized, parallel schedule for a fused (batch-)matmul PrimFunc: static shapes, symbolic batch /
    reduction extents (a symbolic reduction bound), or a symbolic row / column extent (:func:`_apply_symbolic`; if
    one of its primitives does not apply, the older schedule with guarded rows and zero-padded copies)."""

    def apply(self, func, target: Target, _tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        found = _matmul_block(sch)
        if found is None:
            return None
        infos, idx, nspatial = found
        rb = infos[idx]
        dk = rb.dom_kind()
        loops = sch.get_loops(rb.block_rv)
        exts = [_extent(sch, lp) for lp in loops]
        if _ksplit_wanted(exts, nspatial):
            try:
                _apply_ksplit(sch, rb.block_rv, [b.block_rv for b in infos[idx + 1 :]], nspatial,
                              vector_lanes(target))
                return sch
            except Exception as exc:  # noqa: BLE001 - the K-split is an optimization: tile the function instead
                log.debug("K-split schedule skipped: %s", exc)
                sch = s_tir.Schedule(func)
                infos, idx, nspatial = _matmul_block(sch)
                rb = infos[idx]
                loops = sch.get_loops(rb.block_rv)
        lanes = vector_lanes(target)
        if exts[nspatial - 2] is None or exts[nspatial - 1] is None:
            try:
                return _apply_symbolic(func, lanes)  # None: not a tiled matmul (a matrix-vector product)
            except Exception as exc:  # noqa: BLE001 - fall back to the padded-copy schedule below
                log.debug("symbolic matmul schedule skipped: %s", exc)
                sch = s_tir.Schedule(func)
                infos, idx, nspatial = _matmul_block(sch)
                rb = infos[idx]
                dk = rb.dom_kind()
                loops = sch.get_loops(rb.block_rv)
        # batch, row and reduction extents may be symbolic (one artefact for every batch and length): the row tile
        # then gets a guarded tail and the reduction loop a symbolic bound; a symbolic column extent is padded
        symbolic = any(e is None for i, e in enumerate(exts) if i != nspatial - 1)
        copies: list = []
        symbolic_cols = exts[nspatial - 1] is None
        if symbolic_cols:
            # a symbolic column extent (q·kᵀ of a dynamic length): padded to a multiple of the column tile inside
            # the kernel (operands zero-padded, result cropped), so the vector tile needs no guard
            widths = (4 if exts[nspatial - 2] is None else 1, SYMBOLIC_COLUMN_VECTORS * lanes)
        else:
            widths = (exts[nspatial - 2], exts[nspatial - 1]) if symbolic else \
                _padded_extents(exts[nspatial - 2], exts[nspatial - 1], lanes)
        if symbolic_cols or widths != (exts[nspatial - 2], exts[nspatial - 1]):
            # no register tile divides the row / column extent (197 columns of a ViT-Base q·kᵀ, ...): compute on
            # zero-padded operands instead of falling back to the unscheduled rule; the pad and crop copies are
            # scheduled as flat vector loops below
            blocks_before = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
            try:
                sch.pad_einsum(rb.block_rv, [1] * (nspatial - 2) + list(widths) + [1] * (len(dk) - nspatial))
            except Exception as exc:  # noqa: BLE001 - padding is an optimization; leave the block to other rules
                log.debug("matmul padding to %s skipped: %s", widths, exc)
                return None
            copies = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                      if sch.get(b).name_hint not in blocks_before]
            loops = sch.get_loops(rb.block_rv)
            exts = [_extent(sch, lp) for lp in loops]
        sp, rd = loops[:nspatial], loops[nspatial:]
        ni, nj = exts[nspatial - 2], exts[nspatial - 1]
        nj_tile = SYMBOLIC_COLUMN_VECTORS * lanes if symbolic_cols else \
            _largest_divisor(nj, (2 * lanes, lanes, lanes // 2, 4))
        ni_tile = 4 if ni is None else _largest_divisor(ni, (4, 3, 2))  # symbolic rows: guarded 4-row tiles
        if nj_tile < 4:
            return None
        b_read = _column_operand(sch.get(rb.block_rv), nspatial)
        i_o, i_i = sch.split(sp[-2], factors=[None, ni_tile])
        j_o, j_i = sch.split(sp[-1], factors=[None, nj_tile])
        k = sch.fuse(*rd) if len(rd) > 1 else rd[0]
        batch = list(sp[:-2])
        nk = _static_product(exts[nspatial:])
        # packing reorders loops so A is re-read once per column panel: only when A (per batch) stays cached
        pack = b_read is not None and ni is not None and nk is not None and ni > ni_tile and nk >= PACK_MIN_K \
            and ni * nk * 4 <= PACK_MAX_A_BYTES
        if pack:
            # column panels outermost: one packed (K x NJ) panel of B per parallel task, reused by all row tiles
            sch.reorder(*batch, j_o, i_o, k, i_i, j_i)
            outer = sch.fuse(*batch, j_o)
            tile = i_o
        else:
            sch.reorder(*batch, i_o, j_o, k, i_i, j_i)
            outer = sch.fuse(*batch, i_o, j_o)
            tile = outer
        acc = sch.cache_write(rb.block_rv, 0, _acc_scope(symbolic or symbolic_cols))
        sch.reverse_compute_at(acc, tile, preserve_unit_loops=True)
        for epi in infos[idx + 1 :]:
            try:
                sch.reverse_compute_inline(epi.block_rv)
            except Exception:  # noqa: BLE001 - keep the epilogue as a separate per-tile block
                sch.reverse_compute_at(epi.block_rv, tile, preserve_unit_loops=True)
        if pack:
            try:
                panel = sch.cache_read(rb.block_rv, b_read, "global")
                sch.compute_at(panel, outer, preserve_unit_loops=True)
                pl = sch.get_loops(panel)
                pe = _extent(sch, pl[-1])
                if pe is not None and pe >= 4:
                    sch.vectorize(pl[-1])
            except Exception as exc:  # noqa: BLE001 - packing is an optimization only
                log.debug("B panel packing skipped: %s", exc)
        total = 1
        for e in exts:
            total *= e if e is not None else SMALL_WORK  # a symbolic extent counts as large
        if total >= SMALL_WORK:
            sch.parallel(outer)
        sch.unroll(i_i)
        sch.vectorize(j_i)
        init = sch.decompose_reduction(rb.block_rv, k)
        iloops = sch.get_loops(init)
        sch.vectorize(iloops[-1])
        for blk in [acc] + [e.block_rv for e in infos[idx + 1 :] if _alive(sch, e.block_rv)]:
            if any(sch.get(blk).same_as(sch.get(c)) for c in copies if _alive(sch, c)):
                continue
            bl = sch.get_loops(blk)
            if len(bl) > 1:
                inner = bl[-1]
                e = _extent(sch, inner)
                if e is not None and e > 1:
                    sch.vectorize(inner)
        for blk in copies:
            if _alive(sch, blk):
                _flat_vector_loop(sch, blk, lanes)
        return sch


def _clamp_pad_block(sch: s_tir.Schedule, block_rv) -> None:
    """Rewrite a producer block made by ``pad_einsum``, ``X_pad[v] = if_then_else(v_a < e_a and ..., X[v], 0)``,
    into ``X_pad[v] = X[..., min(v_a, e_a - 1), ...]``: the padded rows / columns repeat the last real one (in
    bounds, no branch) instead of zeros.  Valid only for spatial padding, whose results are cropped away."""
    from tvm.ir import Range
    from tvm.s_tir import SBlock

    block = sch.get(block_rv)
    store = block.body
    call = store.value
    if not isinstance(store, tirx.BufferStore) or not isinstance(call, tvm.ir.Call) or len(call.args) != 3:
        raise ValueError(f"unexpected pad block {block.name_hint}")
    cond, load = call.args[0], call.args[1]
    bounds = []
    stack = [cond]
    while stack:
        c = stack.pop()
        if isinstance(c, tirx.And):
            stack += [c.a, c.b]
        elif isinstance(c, tirx.LT) and isinstance(c.a, tirx.Var):
            bounds.append((c.a, c.b))
        else:
            raise ValueError(f"unexpected pad condition {c}")
    if not isinstance(load, tvm.ir.TensorLoad):
        raise ValueError(f"unexpected pad value {load}")

    def clamp(ix):
        for var, bound in bounds:
            if isinstance(ix, tirx.Var) and ix.same_as(var):
                return tirx.min(ix, bound - 1)
        return ix

    indices = [clamp(ix) for ix in load.indices]
    new_store = tirx.BufferStore(store.buffer, tirx.BufferLoad(load.source, indices), store.indices)
    reads = [tirx.BufferRegion(load.source, [Range.from_min_extent(ix, 1) for ix in indices])]
    new_block = SBlock(block.iter_vars, reads, block.writes, block.name_hint, new_store, block.init,
                       block.alloc_buffers, block.match_buffers, block.annotations)
    sch.state.replace(sch.get_sref(block_rv), new_block, {block: new_block})


def _mark_likely(sch: s_tir.Schedule, block_rv) -> bool:
    """Wrap the predicate of a block (a guarded tail from splitting a run-time extent) in ``likely``, so TVM's
    ``LoopPartition`` splits the enclosing loop into a guard-free main part and a guarded remainder instead of
    testing the guard on every iteration of the hot loop.  False (nothing changed) when the block has no predicate
    or does not sit directly in a loop."""
    from tvm.s_tir import SBlockRealize

    loops = sch.get_loops(block_rv)
    if not loops:
        return False
    parent = sch.get(loops[-1])
    realize = parent.body
    if not isinstance(realize, SBlockRealize) or _const(realize.predicate) == 1:
        return False
    conjuncts, stack = [], [realize.predicate]
    while stack:
        c = stack.pop()
        if isinstance(c, tirx.And):
            stack += [c.b, c.a]
        else:
            conjuncts.append(c)
    # conjuncts true for every iteration of the enclosing loops (``tile - num_tiles < 0 or ...`` added by
    # reverse_compute_at) are dropped; the others are marked one by one: LoopPartition uses those it can solve
    # for a loop variable (``j < n``), and the simplifier removes them from the main part
    from tvm.sym.analyzer import Analyzer, ProofStrength

    analyzer = Analyzer()
    for lp in loops:
        f = sch.get(lp)
        analyzer.bind(f.loop_var, tvm.ir.Range.from_min_extent(f.min, f.extent))
    positive = tirx.const(True, "bool")  # every run-time extent of the block's buffers is >= 1 when it runs
    for region in list(realize.block.reads) + list(realize.block.writes):
        for dim in region.source.shape:
            if isinstance(dim, tirx.Var):
                positive = tirx.And(positive, dim >= 1)
    with analyzer.constraint_scope(positive):
        kept = [c for c in conjuncts if not analyzer.can_prove(c, ProofStrength.SYMBOLIC_BOUND)]
    if not kept:
        kept = [tirx.const(True, "bool")]
    predicate = tirx.likely(kept[0])
    for c in kept[1:]:
        predicate = tirx.And(predicate, tirx.likely(c))
    new_realize = SBlockRealize(realize.iter_values, predicate, realize.block)
    new_loop = tirx.For(parent.loop_var, parent.min, parent.extent, parent.kind, new_realize,
                        parent.thread_binding, parent.annotations)
    sch.state.replace(sch.get_sref(loops[-1]), new_loop, {realize.block: realize.block})
    return True


#: Register tile of the symbolic-extent schedule: rows (padded to a multiple) x column vectors.
SYMBOLIC_ROW_TILE = 4
#: A gathered column operand (the k of q·kᵀ read as k[j, d]) of a run-time column extent is packed j-last once per
#: call when its O(columns x K) copy is amortized over at least this many rows (always for run-time rows);
#: below it (phi(Q)·sum(phi(K)) per head: 8 rows) the multiply-accumulate gathers it like the static schedule.
PACK_GATHERED_MIN_ROWS = 64
#: Rows assumed for a run-time row extent when deciding whether B is packed into column panels (panel-major order
#: re-reads A once per panel, so A should stay near the core: PACK_MAX_A_BYTES); 128 rows: K <= 2048 packs, which
#: covers every MiniLM/BERT-base linear layer (a run-time K, P·V of unfused attention, never packs).  Measured
#: (1536 -> 384 + bias, Zen 4, 1 thread, shared host) against the static build: 1 x 512 0.99x unpacked / 0.87x
#: packed, 8 x 128 1.28x / 1.01x -- at 512 rows the 3 MiB of A re-read per panel still comes from L3.
SYMBOLIC_PACK_ROWS = 128
#: Storage scope of the register-tile accumulators of the symbolic schedules.  ``global``, not ``local``: TVM's
#: LowerTVMBuiltin turns every non-global allocation on a CPU into a TVMBackendAllocWorkspace call, and LLVM
#: then kept the accumulators of the int64-indexed symbolic kernels in that heap memory, storing all eight
#: vectors after every multiply-accumulate (the static kernels' vector-typed tile happened to be promoted to
#: registers); a global allocation of constant size below 1 KiB stays an ``alloca``, which LLVM promotes.
#: Measured on the MiniLM FFN shape (384 -> 1536 + bias + Relu, 1 x 512, 1 thread): 2.5x -> 1.04x static.
SYMBOLIC_ACC_SCOPE = "global"


def _static_product(extents) -> int | None:
    """Product of loop extents (e.g. the reduction length K), or None when any of them is a run-time extent."""
    out = 1
    for e in extents:
        if e is None:
            return None
        out *= e
    return out


def _acc_scope(symbolic: bool) -> str:
    """Scope of a register-tile accumulator: :data:`SYMBOLIC_ACC_SCOPE` in a function with a run-time extent,
    else ``local`` (static builds keep the schedule they were measured with)."""
    return SYMBOLIC_ACC_SCOPE if symbolic else "local"


def _apply_symbolic(func, lanes: int):
    """Schedule of a matmul whose row and/or column extent is symbolic (one artefact for every length).

    The block is computed on an iteration domain padded to the register tile (``pad_einsum``), but nothing is
    padded in memory: the operands' padded rows / columns read the last real row / column (clamped indices,
    :func:`_clamp_pad_block`, inlined into the multiply-accumulate, so the hot loop has neither guards nor copies;
    a column-padded operand whose columns are contiguous is instead copied once into a clamped panel, keeping the
    vector loads contiguous), the accumulators are a constant ``rows x columns`` tile on the stack
    (:data:`SYMBOLIC_ACC_SCOPE`), B is packed into (K x columns) panels when the columns are static and K is long
    (:data:`SYMBOLIC_PACK_ROWS`), and the
    write-back of each tile to the real output (with the fused epilogue) carries the only guard: rows < n, and
    columns < n for a symbolic column extent.  Returns None for fewer static columns than a register tile needs
    (matrix-vector products, left to the reduction rules); raises when a primitive does not apply (the caller
    falls back)."""
    sch = s_tir.Schedule(func)
    infos, idx, nspatial = _matmul_block(sch)
    rb = infos[idx]
    block_rv = rb.block_rv
    loops = sch.get_loops(block_rv)
    exts = [_extent(sch, lp) for lp in loops]
    ni, nj = exts[nspatial - 2], exts[nspatial - 1]
    nred = len(loops) - nspatial
    if ni is None:
        ti = SYMBOLIC_ROW_TILE
    else:
        ti = _largest_divisor(ni, (4, 3, 2))
        if ti == 1 and ni >= 8:
            ti = SYMBOLIC_ROW_TILE
    if nj is None:
        tj = SYMBOLIC_COLUMN_VECTORS * lanes
    else:
        tj = _largest_divisor(nj, (2 * lanes, lanes, lanes // 2, 4))
        if tj < 4:
            if nj < 2 * lanes:
                return None  # a few columns (a matrix-vector product): left to the reduction rules
            tj = lanes
    pad_i = ti if (ni is None or ni % ti) else 1
    pad_j = tj if (nj is None or nj % tj) else 1
    block = sch.get(block_rv)
    ivars = [iv.var for iv in block.iter_vars]
    j_var = ivars[nspatial - 1]
    # the column operand(s) (indexed by j): contiguous along j (last index j) or gathered (j an outer index, the
    # B of q·kᵀ read as k[j, d]); a column-padded copy of either keeps (or makes) the vector loads contiguous
    column_reads: dict = {}
    for region in block.reads:
        mins = [r.min for r in region.region]
        pos = [p for p, m in enumerate(mins) if isinstance(m, tirx.Var) and m.same_as(j_var)]
        if pos:
            column_reads[region.source.name] = pos[0] if pos[0] != len(mins) - 1 else None
    root = sch.get_sblock("root")
    before = {sch.get(b).name_hint for b in sch.get_child_blocks(root)}
    sch.pad_einsum(block_rv, [1] * (nspatial - 2) + [pad_i, pad_j] + [1] * nred)
    new = [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint not in before]
    out_buf = sch.get(block_rv).writes[0].source
    producers, crop = [], None
    for b in new:
        blk = sch.get(b)
        if any(r.source.same_as(out_buf) for r in blk.reads):
            crop = b
        else:
            producers.append(b)
    if crop is None:
        raise ValueError("pad_einsum made no crop block")
    copies = []
    for b in producers:
        _clamp_pad_block(sch, b)
        src = sch.get(b).reads[0].source.name
        pos = column_reads.get(src)
        gathered = src in column_reads and pos is not None
        if pad_j > 1 and src in column_reads and (not gathered or ni is None or ni >= PACK_GATHERED_MIN_ROWS):
            copies.append(b)
            if gathered:
                # a gathered column operand: its copy is laid out with j last (a transposing pack), so the
                # multiply-accumulate loads whole vectors instead of gathering one float per lane
                padded = sch.get(b).writes[0].source
                reads = list(sch.get(block_rv).reads)
                ridx = next(r for r, reg in enumerate(reads) if reg.source.same_as(padded))
                sch.transform_layout(block_rv, ("read", ridx), _move_axis_last(pos))
        else:
            sch.compute_inline(b)
    for epi in infos[idx + 1:]:
        sch.reverse_compute_inline(epi.block_rv)
    loops = sch.get_loops(block_rv)
    sp, rd = loops[:nspatial], loops[nspatial:]
    nk = _static_product(exts[nspatial:])
    b_read = _column_operand(sch.get(block_rv), nspatial) if pad_j == 1 and nj is not None else None
    pack = b_read is not None and nk is not None and nk >= PACK_MIN_K and (ni is None or ni > ti) \
        and (ni if ni is not None else SYMBOLIC_PACK_ROWS) * nk * 4 <= PACK_MAX_A_BYTES
    i_o, i_i = sch.split(sp[-2], factors=[None, ti])
    j_o, j_i = sch.split(sp[-1], factors=[None, tj])
    k = sch.fuse(*rd) if len(rd) > 1 else rd[0]
    batch = list(sp[:-2])
    sch.reorder(*batch, i_o, j_o, k, i_i, j_i)
    static_batch = all(_extent(sch, lp) is not None for lp in batch)
    if pack:
        # static columns, K >= PACK_MIN_K (every linear layer of a dynamic-length model): column panels outermost,
        # B packed into a contiguous (K x tj) panel per parallel task that all (run-time many) row tiles reuse, as
        # in MatmulRule's static schedule (without it the tile reads B with a row stride of the full width: the
        # MiniLM FFN matmul + GELU ran 1.6x its static build)
        sch.reorder(*batch, j_o, i_o)
        outer = sch.fuse(*batch, j_o) if batch else j_o
        tile = i_o
    elif nj is None and ni is not None and static_batch:
        # few static rows, run-time columns (a matrix-vector product per head): parallel over column tiles
        # outermost, so the column tile is ``fused // (batch x row tiles)`` and LoopPartition (below) can still
        # split off the ragged last column tile
        sch.reorder(j_o, *batch, i_o)
        outer = sch.fuse(j_o, *batch, i_o)
        tile = outer
    elif nj is None:
        # column tiles run serially inside each row tile: LoopPartition (below) then splits the column loop into
        # full tiles, whose write-back is unguarded and vectorized, and the one ragged tile
        outer = sch.fuse(*batch, i_o) if batch else i_o
        tile = j_o
    else:
        outer = sch.fuse(*batch, i_o, j_o)
        tile = outer
    sch.set_scope(block_rv, 0, SYMBOLIC_ACC_SCOPE)
    sch.reverse_compute_at(crop, tile, preserve_unit_loops=True)
    if pack:
        panel = sch.cache_read(block_rv, b_read, "global")
        sch.compute_at(panel, outer, preserve_unit_loops=True)
        pe = _extent(sch, sch.get_loops(panel)[-1])
        if pe is not None and pe >= 4:
            sch.vectorize(sch.get_loops(panel)[-1])
    sch.parallel(outer)
    sch.unroll(i_i)
    sch.vectorize(j_i)
    init = sch.decompose_reduction(block_rv, k)
    sch.vectorize(sch.get_loops(init)[-1])
    cl = sch.get_loops(crop)
    tail = _extent(sch, cl[-1])
    if tail is not None and tail > 1:
        sch.vectorize(cl[-1])
    if nj is None:
        _mark_likely(sch, crop)
    for b in copies:
        _copy_loops(sch, b, lanes)
    return sch


def _move_axis_last(pos: int):
    """Index map ``(a0, ..., a_pos, ..., a_n) -> (a0, ..., a_n, a_pos)``."""

    def mapping(*axes):
        return list(axes[:pos]) + list(axes[pos + 1:]) + [axes[pos]]

    return mapping


def _copy_loops(sch: s_tir.Schedule, block, lanes: int) -> None:
    """A copy block with symbolic extents: outer loops fused and parallel, the innermost (static) loop vectorized
    when the vector width divides it."""
    loops = sch.get_loops(block)
    inner = _extent(sch, loops[-1])
    if len(loops) > 1:
        outer = sch.fuse(*loops[:-1])
        sch.parallel(outer)
    if inner is not None and inner % lanes == 0:
        _, v = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(v)


def _matmul_block(sch: s_tir.Schedule):
    """(block infos, index of the multiply-accumulate block, number of its spatial axes) when the function is one
    reduction block ``C[..., i, j] += ...`` (spatial axes first, at least two; two reads or more) followed only by
    injective epilogue blocks; else None."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    infos = try_inline_contiguous_spatial(sch, infos)
    if infos is None:
        return None
    reds = [b for b in infos if not b.is_injective()]
    if len(reds) != 1:
        return None
    rb = reds[0]
    dk = rb.dom_kind()
    nspatial = len(dk) - len(dk.lstrip("S"))
    if nspatial < 2 or set(dk[nspatial:]) != {"R"}:
        return None
    if len(sch.get(rb.block_rv).reads) < 2:
        return None
    idx = infos.index(rb)
    if any(not b.is_injective() for b in infos[idx + 1 :]) or idx != 0:
        return None
    if len(sch.get_loops(rb.block_rv)) != len(dk):
        return None
    return infos, idx, nspatial


#: K-split (parallel reduction) for long-K small-output matmuls (φ(K)ᵀV: 64 x 64 per head, K = N): from this
#: reduction length, while the output (rows x columns) is at most KSPLIT_MAX_OUTPUT elements, ... (measured at
#: K = 16384, H = 8, 1 thread on a loaded Zen 4: 72 -> 44 ms; chunk 128/256/512 and 4x2/8x2/4x4 tiles within
#: noise of each other, 4x4 best)
KSPLIT_MIN_K = 2048
KSPLIT_MAX_OUTPUT = 128 * 128
#: ... K is cut into chunks of KSPLIT_CHUNK: one parallel task computes the whole output of its chunk (both
#: operand chunks, 2 x 256 x 64 floats, stay in L2) into a partial sum; a vectorized pass adds the partial sums.
KSPLIT_CHUNK = 256


def _ksplit_wanted(exts: list, nspatial: int) -> bool:
    """Whether the matmul with loop extents ``exts`` (spatial first) gets the K-split schedule: static row,
    column and reduction extents, a reduction of at least KSPLIT_MIN_K that KSPLIT_CHUNK divides, and a small
    output per batch."""
    ni, nj = exts[nspatial - 2], exts[nspatial - 1]
    red = exts[nspatial:]
    if ni is None or nj is None:
        return False
    if any(e is None for e in red):
        # a run-time reduction length (φ(K)ᵀV of a dynamic-length build): the last chunk is guarded
        return len(red) == 1 and ni * nj <= KSPLIT_MAX_OUTPUT
    nk = _static_product(red)
    return nk >= KSPLIT_MIN_K and nk % KSPLIT_CHUNK == 0 and ni * nj <= KSPLIT_MAX_OUTPUT


def _apply_ksplit(sch: s_tir.Schedule, block_rv, epilogues: list, nspatial: int, lanes: int) -> None:
    """K-split schedule of a matmul block (raises when a primitive does not apply; the caller starts afresh).

    The reduction is split into chunks (``rfactor``): the partial-sum block ``C_rf[chunk, ..., i, j]`` is tiled
    like :class:`MatmulRule` (4-row x 4-vector register tile on AVX-512, 4 x 2 on AVX2, local accumulators,
    unrolled rows, vector columns)
    with chunk x batch as the parallel axis; the final block adds the partial sums vectorized along the columns,
    parallel over batch x rows; epilogue blocks stay separate flat vector loops."""
    loops = sch.get_loops(block_rv)
    rd = loops[nspatial:]
    k = sch.fuse(*rd) if len(rd) > 1 else rd[0]
    ko, ki = sch.split(k, factors=[None, KSPLIT_CHUNK])
    rf = sch.rfactor(ko, factor_axis=0)
    # the partial-sum block: loops (batch..., i, j, ko, ki) with ko now spatial
    rl = sch.get_loops(rf)
    batch, i, j, ko, ki = rl[: nspatial - 2], rl[nspatial - 2], rl[nspatial - 1], rl[nspatial], rl[nspatial + 1]
    ni, nj = _extent(sch, i), _extent(sch, j)
    vectors = (4, 2, 1) if lanes >= 16 else (2, 1)  # 16 accumulators of 32 AVX-512 registers; 8 of 16 on AVX2
    nj_tile = _largest_divisor(nj, tuple(v * lanes for v in vectors) + (lanes // 2, 4))
    ni_tile = _largest_divisor(ni, (4, 3, 2))
    if nj_tile < 4:
        raise ValueError(f"no vector column tile divides {nj}")
    i_o, i_i = sch.split(i, factors=[None, ni_tile])
    j_o, j_i = sch.split(j, factors=[None, nj_tile])
    sch.reorder(ko, *batch, i_o, j_o, ki, i_i, j_i)
    outer = sch.fuse(ko, *batch)
    acc = sch.cache_write(rf, 0, _acc_scope(any(_extent(sch, lp) is None for lp in sch.get_loops(rf))))
    sch.reverse_compute_at(acc, j_o, preserve_unit_loops=True)
    sch.parallel(outer)
    sch.unroll(i_i)
    sch.vectorize(j_i)
    init = sch.decompose_reduction(rf, ki)
    _mark_likely(sch, rf)  # a run-time K: only the last chunk is guarded
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    # the sum over chunks: (batch..., i, j, ko) -> (batch..., i, ko, j), j vectorized
    fl = sch.get_loops(block_rv)
    fbatch, fi, fj, fko = fl[: nspatial - 2], fl[nspatial - 2], fl[nspatial - 1], fl[nspatial]
    sch.reorder(*fbatch, fi, fko, fj)
    sch.parallel(sch.fuse(*fbatch, fi))
    if nj % lanes == 0:
        _, fv = sch.split(fj, factors=[None, lanes])
        sch.vectorize(fv)
    sch.decompose_reduction(block_rv, fko)
    for epi in epilogues:
        _flat_vector_loop(sch, epi, lanes)


def _column_operand(block, nspatial: int) -> int | None:
    """Index of the read indexed by the column axis j and the reduction axis k only (the B of A @ B)."""
    ivars = [iv.var for iv in block.iter_vars]
    j_var, k_var, i_var = ivars[nspatial - 1], ivars[nspatial], ivars[nspatial - 2]
    for idx, region in enumerate(block.reads):
        mins = [r.min for r in region.region]
        names = " ".join(str(m) for m in mins)
        has = lambda v: any(isinstance(m, tirx.Var) and m.same_as(v) for m in mins)  # noqa: E731
        if has(j_var) and has(k_var) and not has(i_var) and str(i_var.name) not in names:
            return idx
    return None


def _alive(sch, block_rv) -> bool:
    try:
        sch.get(block_rv)
        return True
    except Exception:  # noqa: BLE001
        return False


class StridedReductionRule(CPUScheduleRule):
    """A reduction over an axis that is not innermost in memory (``k.sum(-2)`` of a (B, H, N, d) tensor): the
    reduction loop moves outside the kept innermost axis, which is vectorized, with accumulators in ``local``
    (d floats) and parallel over the other kept axes; stock rules walk each column with a stride instead
    (measured (1, 8, 16384, 64) on a loaded Zen 4, 1 thread: 40 ms -> see docs/benchmarks.md).

    Applies to one reduction block (injective producers inlined) whose spatial axes come first and whose last
    spatial axis, of static extent divisible by the vector width, indexes the innermost dim of every read."""

    def apply(self, func, target: Target, _tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None or len(infos) != 1 or infos[0].is_injective():
            return None
        rb = infos[0]
        dk = rb.dom_kind()
        nspatial = len(dk) - len(dk.lstrip("S"))
        if nspatial < 1 or set(dk[nspatial:]) != {"R"}:
            return None
        loops = sch.get_loops(rb.block_rv)
        if len(loops) != len(dk):
            return None
        lanes = vector_lanes(target)
        inner = _extent(sch, loops[nspatial - 1])
        if inner is None or inner % lanes:
            return None
        block = sch.get(rb.block_rv)
        last = block.iter_vars[nspatial - 1].var
        for region in block.reads:
            idx = region.region[-1].min
            if not (isinstance(idx, tirx.Var) and idx.same_as(last)):
                return None
        total = 1
        for lp in loops:
            e = _extent(sch, lp)
            total *= e if e is not None else SMALL_WORK  # a symbolic extent counts as large
        outer_sp, kept, rd = loops[: nspatial - 1], loops[nspatial - 1], loops[nspatial:]
        sch.reorder(*outer_sp, *rd, kept)
        symbolic = any(_extent(sch, lp) is None for lp in loops)
        outer = sch.fuse(*outer_sp) if len(outer_sp) > 1 else (outer_sp[0] if outer_sp else None)
        acc = sch.cache_write(rb.block_rv, 0, _acc_scope(symbolic))
        if outer is not None:
            sch.reverse_compute_at(acc, outer, preserve_unit_loops=True)
        if outer is not None and total >= SMALL_WORK:
            sch.parallel(outer)  # before the reduction is decomposed (parallel needs the block with its init)
        _, vec = sch.split(kept, factors=[None, lanes])
        sch.vectorize(vec)
        init = sch.decompose_reduction(rb.block_rv, rd[0])
        _, ivec = sch.split(sch.get_loops(init)[-1], factors=[None, lanes])
        sch.vectorize(ivec)
        _, avec = sch.split(sch.get_loops(acc)[-1], factors=[None, lanes])
        sch.vectorize(avec)
        return sch


class GuardedReduction(dl.cpu.Reduction):
    """``dl.cpu.Reduction`` restricted to functions whose fused leading spatial extent is > 1 (it is O(N^2) on one row)."""

    def apply(self, func, target: Target, tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        # The leading extent is read off the reduction blocks: normalize_prim_func drops unit loops of injective
        # blocks, so a (1, N) softmax shows its N as the "leading" axis of the exp/normalize blocks.
        reds = [bi for bi in infos if not bi.is_injective()]
        if not reds:
            return None
        for bi in reds:
            dk = bi.dom_kind()
            n = len(dk) - len(dk.lstrip("S"))
            if n == 0:
                return None
            ext = 1
            for d in bi.dom()[:n]:
                c = _const(d)
                ext *= 2 if c is None else c  # symbolic leading extent: assume > 1
            if ext <= 1:
                return None
        return super().apply(func, target, tunable)


def _transposed_read(sch: s_tir.Schedule, block_rv) -> bool:
    """True when the block reads a buffer whose innermost index is a block iterator other than the innermost one
    while the innermost iterator indexes an outer axis (a transpose of the last two axes, or a permutation moving
    the last axis): fusing all loops would then read with a large stride."""
    block = sch.get(block_rv)
    if len(block.iter_vars) < 2:
        return False
    last = block.iter_vars[-1].var
    for region in block.reads:
        ranges = list(region.region)
        if len(ranges) < 2:
            continue
        inner = ranges[-1].min
        if isinstance(inner, tirx.Var) and not inner.same_as(last) and \
                any(isinstance(r.min, tirx.Var) and r.min.same_as(last) for r in ranges[:-1]):
            return True
    return False


#: Tile edge of the transpose schedule (a TILE x TILE block of the input stays in L1 while it is gathered).
TRANSPOSE_TILE = 16


def _tile_transpose(sch: s_tir.Schedule, loops, lanes: int) -> bool:
    """Tiled transpose: the last two loops split by TRANSPOSE_TILE, tile loops outermost and parallel, the row loop
    of a tile unrolled, its column loop vectorized (contiguous stores, gathers within L1).  False when the last two
    extents are not static multiples of the tile."""
    if len(loops) < 2:
        return False
    ei, ej = _extent(sch, loops[-2]), _extent(sch, loops[-1])
    t = TRANSPOSE_TILE
    if ei is None or ej is None or ei % t or ej % t or ej % lanes:
        return False
    io, ii = sch.split(loops[-2], factors=[None, t])
    jo, ji = sch.split(loops[-1], factors=[None, t])
    sch.reorder(io, jo, ii, ji)
    outer = sch.fuse(*loops[:-2], io, jo) if len(loops) > 2 else sch.fuse(io, jo)
    sch.parallel(outer)
    sch.unroll(ii)
    if t > lanes:
        _, jv = sch.split(ji, factors=[None, lanes])
        sch.vectorize(jv)
    else:
        sch.vectorize(ji)
    return True


def _tile_symbolic_transpose(sch: s_tir.Schedule, loops, lanes: int) -> bool:
    """Transpose whose last two loops are one static and one symbolic extent (``(h, n, 64) -> (h, 64, n)``): the
    static loop is cut into tiles of 16 (8, 4) rows, parallel over outer x tiles.  When the run-time axis is the
    output's innermost (and the tile is 16), it is cut into tiles of 16 too: 16 x 16 tiles as in the static schedule
    (gathers within L1, vector stores), the ragged last tile guarded by a ``likely`` predicate that LoopPartition
    splits off.  Otherwise the order is (outer..., tile, symbolic loop, row in tile): each step reads 16 contiguous
    floats of one row and writes one float to each of 16 output streams (or, when the static loop is the output's
    innermost, writes 16 contiguous floats).  No division by the run-time extent.  False when the pattern does not
    hold."""
    if len(loops) < 2:
        return False
    e_a, e_b = _extent(sch, loops[-2]), _extent(sch, loops[-1])
    if (e_a is None) == (e_b is None):
        return False
    static_last = e_b is not None
    ext = e_b if static_last else e_a
    t = _largest_divisor(ext, (16, 8, 4))
    if t == 1:
        return False
    sym_loop, st_loop = (loops[-2], loops[-1]) if static_last else (loops[-1], loops[-2])
    block = sch.get_sblock(sch.get(loops[-1]).body.block.name_hint)
    st_o, st_i = sch.split(st_loop, factors=[None, t])
    if not static_last and t == TRANSPOSE_TILE and t % lanes == 0:
        # the run-time axis is the output's innermost: t x t tiles as in the static schedule (gathers within L1,
        # contiguous vector stores); the ragged last tile is guarded and split off by LoopPartition
        sym_o, sym_i = sch.split(sym_loop, factors=[None, t])
        sch.reorder(*loops[:-2], st_o, sym_o, st_i, sym_i)
        sch.parallel(sch.fuse(*loops[:-2], st_o) if len(loops) > 2 else st_o)
        sch.unroll(st_i)
        _, v = sch.split(sym_i, factors=[None, lanes])
        sch.vectorize(v)
        _mark_likely(sch, block)
        return True
    sch.reorder(*loops[:-2], st_o, sym_loop, st_i)
    sch.parallel(sch.fuse(*loops[:-2], st_o) if len(loops) > 2 else st_o)
    if static_last and t % lanes == 0:
        _, v = sch.split(st_i, factors=[None, lanes])
        sch.vectorize(v)
    else:
        sch.unroll(st_i)
    return True


def _symbolic_injective(sch: s_tir.Schedule, loops, lanes: int) -> None:
    """Injective loops with symbolic extents: the trailing loops of static extent are fused into one inner loop,
    vectorized by ``lanes`` (or half of it) where that divides it; the loops above it are fused into one parallel
    loop, except that the innermost symbolic loop stays a serial loop inside it when the static part is shorter
    than a vector (a transpose whose last axis is the symbolic length).  Fusing across a symbolic extent puts a
    division by a run-time value into the index of every element (a vectorized lane scalarizes it: a (b, n, 12, 32)
    transpose ran 50x slower than its static build); here there is one per parallel iteration."""
    k = len(loops)
    while k > 0 and _extent(sch, loops[k - 1]) is not None:
        k -= 1
    outer_loops, inner_loops = list(loops[:k]), list(loops[k:])
    static = 1
    for lp in inner_loops:
        static *= _extent(sch, lp)
    if inner_loops:
        inner = sch.fuse(*inner_loops) if len(inner_loops) > 1 else inner_loops[0]
        for width in (lanes, lanes // 2):
            if static % width == 0 and static >= width:
                _, v = sch.split(inner, factors=[None, width])
                sch.vectorize(v)
                break
    if static < lanes and len(outer_loops) > 1:
        outer_loops = outer_loops[:-1]  # the last symbolic loop runs serially inside each parallel iteration
    if outer_loops:
        sch.parallel(sch.fuse(*outer_loops) if len(outer_loops) > 1 else outer_loops[0])


class InjectiveRule(CPUScheduleRule):
    """All blocks spatial: inline producers, fuse the output loops, vectorize the inner split, parallel the outer."""

    def apply(self, func, target: Target, _tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or any(not b.is_injective() for b in infos):
            return None
        if any(sch.get(b.block_rv).init is not None for b in infos):
            # a reduction over a length-1 axis (a matmul with K = 1, the outer product of a one-token decode
            # step) looks injective once its unit loop is dropped, but inlining its consumer into it would apply
            # the consumer to the init value and again to the update (Add(S, MatMul) gave 2 S + a b); left to
            # the fallback rule, which schedules each block as it is
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None:
            return None
        lanes = vector_lanes(target)
        for bi in infos:
            loops = sch.get_loops(bi.block_rv)
            if not loops:
                continue
            if _transposed_read(sch, bi.block_rv) and _tile_transpose(sch, loops, lanes):
                continue
            if any(_extent(sch, lp) is None for lp in loops):
                if not (_transposed_read(sch, bi.block_rv) and _tile_symbolic_transpose(sch, loops, lanes)):
                    _symbolic_injective(sch, loops, lanes)
                continue
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            ext = _extent(sch, fused)
            if ext is not None and ext < SMALL_WORK:
                if ext >= lanes and ext % lanes == 0:
                    _, v = sch.split(fused, factors=[None, lanes])
                    sch.vectorize(v)
                continue
            o, i = sch.split(fused, factors=[None, lanes])
            sch.vectorize(i)
            sch.parallel(o)
        return sch


class FallbackRule(CPUScheduleRule):
    """Parallelize the outermost spatial loop and vectorize the innermost spatial loop of each block."""

    def apply(self, func, target: Target, _tunable: bool):  # noqa: D102
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        lanes = vector_lanes(target)
        for bi in infos:
            loops = sch.get_loops(bi.block_rv)
            dk = bi.dom_kind()
            if not loops or len(loops) != len(dk):
                continue
            if dk[0] == "S":
                e0 = _extent(sch, loops[0])
                if e0 is None or e0 > 1:
                    sch.parallel(loops[0])
            if len(loops) > 1 and dk[-1] == "S":
                e = _extent(sch, loops[-1])
                if e is not None and e >= lanes and e % lanes == 0:
                    _, v = sch.split(loops[-1], factors=[None, lanes])
                    sch.vectorize(v)
        return sch


def cpu_rules() -> list:
    """The ordered rule list of the CPU pipeline (never contains ``dl.cpu.GEMV``)."""
    return [MatmulRule(), StridedReductionRule(), GuardedReduction(), InjectiveRule(), FallbackRule()]
