"""The linear-attention core shared by ``linear``, ``mala`` and the hybrid window.

``apply(fq, fk, v)`` computes out_i = fq_iᵀ Σ_{j visible from i} fk_j v_jᵀ for fq (B,H,S,F), fk (B,H,T,F),
v (B,H,T,E) → (B,H,S,E). Causal callers fold denominators in by appending a ones column to v and key padding in by
zeroing rows of fk. Everything here runs in the caller's dtype (callers pass fp32 or fp64).

Non-causal (the common encoder case) has a dedicated form: ``noncausal_state`` gives KV = Σ_j fk_j v_jᵀ (F×E per
head) and z = Σ_j fk_j, and ``noncausal_normalized`` reads out (fq KV) / (fq z + ε) with two products against the
small state, no ones column (a ones column costs an N×(E+1) concat, an N×(E+1) product with an odd row stride and
two strided slices, all over N-sized tensors).

Causal visibility: key j is visible from query i iff j <= i + (T - S) - shift. ``shift`` > 0 excludes the last
``shift`` keys of the causal prefix (used by the sliding-window hybrid).

Causal forms (``auto``, the default, is ``chunked``, in eager and under tracing: FX programs and ONNX exports get
the O(N)-memory form, and TVM builds it with a symbolic batch and length; ``prefix`` stays selectable):
- ``chunked``: parallel chunk form, chunk C: intra-chunk tril(φQ φKᵀ)V plus φQ times the exclusive
  cumulative sum of per-chunk states. Memory O(N·C + N/C·F·E); no loops. Under tracing the chunks are cut by a
  gather of rows by a clamped ((N + 2C) // C, C) index grid (no reshape of N rows, no padding), so
  torch.export and the ONNX exporter keep the length dynamic and TVM compiles it with symbolic batch and length.
- ``prefix``: cumulative sum of φ(k_j) v_jᵀ; materialises an N×F×E tensor (tests/small N only; exported on
  request with ``causal_form=prefix``).
- ``loop``: Python loop over chunks with a running F×E state (recurrent form, O(N) memory); eager only.
"""
from __future__ import annotations

from typing import Any

import torch

CAUSAL_FORMS = ("auto", "chunked", "prefix", "loop")


def colsum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the sequence axis of x (…,N,F) as a row (…,1,F), written as the product 1ᵀ x.

    As a MatMul it lowers (TVM) to a vectorized GEMM over contiguous rows; a ReduceSum over the non-innermost
    sequence axis lowers to a strided column reduction (measured 72 ms vs 4 ms at B=1, H=8, N=16384, F=64).
    """
    return x.new_ones(*x.shape[:-2], 1, x.shape[-2]) @ x


def noncausal_state(fk: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV, z): KV = Σ_j fk_j v_jᵀ (B,H,F,E) and z = Σ_j fk_j as a column (B,H,F,1)."""
    return fk.transpose(-1, -2) @ v, colsum(fk).transpose(-1, -2)


def noncausal_normalized(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """out_i = fq_iᵀ KV / (fq_i · z + ε) (linear attention's non-causal readout). → (B,H,S,E)."""
    kv, z = noncausal_state(fk, v)
    return (fq @ kv) / (fq @ z + eps)


def _prefix_equal(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    states = torch.cumsum(fk.unsqueeze(-1) * v.unsqueeze(-2), dim=-3)  # (B,H,N,F,E)
    return (fq.unsqueeze(-2) @ states).squeeze(-2)


def _zero_rows(x: torch.Tensor, before: Any, after: Any) -> torch.Tensor:
    """``x`` with ``before`` zero rows prepended and ``after`` appended on axis -2 (lengths may be symbolic).
    Written as a concatenation with zeros rather than a pad: with symbolic widths an exported Pad carries computed
    pad widths, which TVM's ONNX importer rejects, while ConstantOfShape + Concat import with symbolic extents."""
    parts = [x]
    if not (isinstance(before, int) and before == 0):
        parts.insert(0, x.new_zeros(*x.shape[:-2], before, x.shape[-1]))
    if not (isinstance(after, int) and after == 0):
        parts.append(x.new_zeros(*x.shape[:-2], after, x.shape[-1]))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else x


def _split_chunks(x: torch.Tensor, nc: Any, pad: Any, chunk: int) -> torch.Tensor:
    """(B,H,N,·) → (B,H,nc,C,·) for concrete lengths: x with ``pad`` zero rows appended (N + pad = nc·C), reshaped."""
    return _zero_rows(x, 0, pad).reshape(*x.shape[:-2], nc, chunk, x.shape[-1])


def _constant_part(n: Any) -> int:
    """The positive integer term of a symbolic length (3 in S + T + 3); 0 for a plain symbol."""
    expr = getattr(getattr(n, "node", None), "expr", None)
    if expr is None:
        return 0
    c = expr.as_coeff_Add()[0]
    return int(c) if c.is_Integer and c > 0 else 0


def _chunk_grid(n: Any, chunk: int, device) -> torch.Tensor:
    """Symbolic length N: the row read by each chunk slot, min(c·C + r, N − 1), as an (nc, C) grid with
    nc = (N + 2C) // C (≥ 2 provably: no op specialises on a size-1 chunk axis; at most two chunks more than
    needed).

    Gathering rows by it cuts x into chunks without a reshape of N + pad rows (torch.export would have to prove a
    divisibility it cannot) and without padding (a Concat or Pad whose extent depends on N: TVM's loop splitting
    fails on it). Slots past N repeat row N − 1: within a chunk they come after every real query (the intra-chunk
    triangle hides them) and their keys enter only the states of chunks whose queries are all padding, so no mask
    is needed; the caller drops the padded outputs."""
    # Spelled (M + 2C) // C + ⌈w / C⌉ for N = M + w (w: the constant term of an offset axis T + S + w): one
    # floordiv of the symbolic rows. Spelled N // C + 2, TVM's schedule of the chunk
    # products fails with a symbolic batch (cache_write: InternalError in PadDividendToDivisor) once S and T are
    # one symbol s in the imported graph (loops read floordiv(s, 32) + 2, buffers floordiv(s + s, 64) + 2);
    # spelled as a sum of one floordiv per symbol, TVM builds it but computes wrong numbers; with the constant
    # inside the floordiv, torch.export emits guards it cannot prove.
    fixed = _constant_part(n)
    nc = (n - fixed + 2 * chunk) // chunk + -(-fixed // chunk)
    grid = torch.arange(nc, device=device)[:, None] * chunk + torch.arange(chunk, device=device)[None, :]
    return torch.clamp(grid, max=n - 1)


def _gather_chunks(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(B,H,N,F) → (B,H,nc,C,F): row grid[c, r] of x in slot (c, r), as an embedding lookup of the rows of x
    viewed as (N, B·H·F).

    Not the advanced index ``x[:, :, grid]``: it exports as a Gather with a negative-index fix-up (Shape, Less,
    Add, Where) that TVM's FuseTIR cannot fuse once the batch is symbolic too (VarRemapGet check in RenewDefs).
    Not ``index_select`` of the flat grid + ``unflatten``: torch.export then guards on (8·(N//8 + 2)) % (N//8 + 2).
    """
    b, h, n, f = x.shape
    rows = x.permute(2, 0, 1, 3).reshape(n, b * h * f)
    picked = torch.nn.functional.embedding(grid, rows)  # (nc, C, B·H·F)
    return picked.reshape(grid.shape[0], grid.shape[1], b, h, f).permute(2, 3, 0, 1, 4)


def _chunked_equal(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunked causal form on equal lengths N: intra-chunk tril(fq fkᵀ) v plus fq times the exclusive prefix of
    the per-chunk states. Memory O(N·C + N/C·F·E); with symbolic N it exports (torch.export, ONNX) guard-free."""
    b, h, n, f = fq.shape
    if isinstance(n, int):
        nc = -(-n // chunk)
        q4, k4, v4 = (_split_chunks(x, nc, nc * chunk - n, chunk) for x in (fq, fk, v))
    else:
        # k, v (and q) share one length by contract; the checks let export treat their symbols as one
        torch._check(fk.shape[-2] == n)
        torch._check(v.shape[-2] == n)
        grid = _chunk_grid(n, chunk, fq.device)
        nc = grid.shape[0]
        q4, k4, v4 = (_gather_chunks(x, grid) for x in (fq, fk, v))
    tril = torch.ones(chunk, chunk, dtype=fq.dtype, device=fq.device).tril()
    intra = ((q4 @ k4.transpose(-1, -2)) * tril) @ v4
    states = k4.transpose(-1, -2) @ v4  # (B,H,nc,F,E)
    # exclusive prefix over chunks without cancellation: the inclusive cumsum read one chunk back (a gather by
    # max(c − 1, 0), chunk 0 zeroed; no Concat along the symbolic chunk axis and no slice of length nc − 1)
    incl = torch.cumsum(states, dim=2)
    pos = torch.arange(nc, device=fq.device)
    excl = incl.index_select(2, torch.clamp(pos - 1, min=0)) * (pos > 0).to(states.dtype)[:, None, None]
    out = (intra + q4 @ excl).flatten(2, 3)
    if isinstance(n, int):
        return out[:, :, :n]
    return out.index_select(2, torch.arange(n, device=fq.device))


def _loop_equal(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    n = fq.shape[-2]
    state = fq.new_zeros(fq.shape[0], fq.shape[1], fq.shape[-1], v.shape[-1])
    outs = []
    for start in range(0, n, chunk):
        qc, kc, vc = fq[:, :, start:start + chunk], fk[:, :, start:start + chunk], v[:, :, start:start + chunk]
        c = qc.shape[-2]
        tril = torch.ones(c, c, dtype=qc.dtype, device=qc.device).tril()
        outs.append(qc @ state + ((qc @ kc.transpose(-1, -2)) * tril) @ vc)
        state = state + kc.transpose(-1, -2) @ vc
    return torch.cat(outs, dim=-2)


def _causal_equal(fq, fk, v, *, chunk: int, form: str) -> torch.Tensor:
    if form in ("auto", "chunked"):
        return _chunked_equal(fq, fk, v, chunk)
    if form == "prefix":
        return _prefix_equal(fq, fk, v)
    if form == "loop":
        return _loop_equal(fq, fk, v, chunk)
    raise ValueError(f"unknown causal form {form!r}; known: {CAUSAL_FORMS}")


def _apply_offset(fq, fk, v, a, b, rq, rk, *, chunk: int, form: str) -> torch.Tensor:
    """out_i = fq_iᵀ Σ_{j + a <= i + b} fk_j v_jᵀ for non-negative pads a (keys) and b (queries).

    Queries and keys are placed on a common axis (query i at i + b, key j at j + a) by zero padding on the left,
    right-padded by rq / rk to a common length, and the equal-length causal form is applied (zero key rows
    contribute nothing).
    """
    s_len = fq.shape[-2]
    fq_p = _zero_rows(fq, b, rq)
    fk_p = _zero_rows(fk, a, rk)
    v_p = _zero_rows(v, a, rk)
    out = _causal_equal(fq_p, fk_p, v_p, chunk=chunk, form=form)
    return out[:, :, b:b + s_len]


def _shifted_equal(fq, fk, v, shift: int, *, chunk: int, form: str) -> torch.Tensor:
    """Equal symbolic lengths N with ``shift`` > 0 (the hybrid window): out_i = fq_iᵀ Σ_{j <= i - shift} fk_j v_jᵀ.

    Query i is read at row i − shift of the plain causal form (which sums keys j <= that row): the queries are
    gathered ``shift`` rows up (rows past N − shift repeat the last query; never read back) and the result gathered
    ``shift`` rows down, rows i < shift zeroed. Gathers by clamped indices, no Concat or Pad with an N-dependent
    extent and no S + T + shift offset axis (half its rows)."""
    n = fq.shape[-2]
    torch._check(fk.shape[-2] == n)
    torch._check(v.shape[-2] == n)
    rows = torch.arange(n, device=fq.device)
    up = fq.index_select(-2, torch.clamp(rows + shift, max=n - 1))
    out = _causal_equal(up, fk, v, chunk=chunk, form=form)
    down = out.index_select(-2, torch.clamp(rows - shift, min=0))
    return down * (rows >= shift).to(out.dtype)[:, None]


def _same_length(a, b) -> bool:
    """True when two (possibly symbolic) lengths are provably equal without adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return bool(statically_known_true(a == b))


def _concrete(*xs) -> bool:
    return all(isinstance(x, int) for x in xs)


def causal_apply(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    shift: int = 0,
    chunk: int = 64,
    form: str = "auto",
) -> torch.Tensor:
    """out_i = fq_iᵀ Σ_{j <= i + (T-S) - shift} fk_j v_jᵀ (bottom-right aligned causal prefix).

    Eager (concrete lengths): works on max(S, T) + shift rows. Under tracing (symbolic S, T, which torch.export
    keeps distinct even for self-attention) queries go to T + i and keys to S + shift + j on an S + T + shift axis:
    linear size expressions, hence no shape guards, at about twice the eager cost.
    """
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    s_len, t_len = fq.shape[-2], fk.shape[-2]
    if not _concrete(s_len, t_len) and _same_length(s_len, t_len):
        # self-attention under tracing: one symbolic length, no offset axis
        if shift == 0:
            return _causal_equal(fq, fk, v, chunk=chunk, form=form)
        return _shifted_equal(fq, fk, v, shift, chunk=chunk, form=form)
    if _concrete(s_len, t_len):
        if s_len == t_len and shift == 0:
            return _causal_equal(fq, fk, v, chunk=chunk, form=form)
        a, b = max(0, s_len - t_len + shift), max(0, t_len - s_len - shift)
        length = max(s_len + b, t_len + a)
        return _apply_offset(fq, fk, v, a, b, length - s_len - b, length - t_len - a, chunk=chunk, form=form)
    return _apply_offset(fq, fk, v, s_len + shift, t_len, shift, 0, chunk=chunk, form=form)


def reverse_apply(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    shift: int = 0,
    chunk: int = 64,
    form: str = "auto",
) -> torch.Tensor:
    """Suffix counterpart: out_i = fq_iᵀ Σ_{j >= i + (T-S) + shift} fk_j v_jᵀ.

    On the flipped sequences (i' = S-1-i, j' = T-1-j) the condition is j' <= i' - shift, independent of T - S.
    """
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    s_len, t_len = fq.shape[-2], fk.shape[-2]
    if _concrete(s_len, t_len):
        length = max(s_len, t_len + shift)
        rq, rk = length - s_len, length - t_len - shift
    else:
        rq, rk = t_len + shift, s_len
    out = _apply_offset(fq.flip(-2), fk.flip(-2), v.flip(-2), shift, 0, rq, rk, chunk=chunk, form=form)
    return out.flip(-2)
