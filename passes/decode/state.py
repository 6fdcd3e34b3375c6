"""One layer's linear attention in its two decode forms: over a prompt (output + state) and one token (RNN step).

The state of a ``linear`` layer is S = Σ_j φ(k_j) v_jᵀ (B, Hs, F, E) and z = Σ_j φ(k_j) (B, Hs, F, 1), summed over
every token seen so far; a ``mala`` layer adds v = Σ_j v_j (B, Hs, 1, E) and n = the token count (B, Hs, 1, 1),
which MALA's read-out needs (y = (s/n) φ(q)ᵀS (1 + 1/(s/n φ(q)·z + ε)) − (s/n) φ(q)·z · v/n). Hs is the number of KV
heads (GQA kept: the query heads of a group read their KV head's state) unless the key feature map has
per-query-head parameters (Hedgehog ``fmap_k`` after GQA expansion), then Hs = H. Its size depends on neither the
position nor the context length.

A hybrid layer (option ``window`` = W > 0: exact softmax over the last W keys, the linear/MALA operator over the
older ones, :mod:`passes.attention.hybrid`) keeps those sums over the keys that have left the window only, plus the
window itself as a shift buffer: ``win_k`` (B, Hkv, W, D) and ``win_v`` (B, Hkv, W, E), the newest key last, and
``win_m`` (B, 1, W, 1), 1 for a slot that holds a key (the first W − 1 tokens leave slots empty). A step folds the
oldest slot into the sums (when it holds a key), shifts the buffers by one and appends the token, then reads out the
window's softmax terms and the rest exactly as the eager form (:func:`hybrid.softmax_terms` and the variants'
``readout``/``hybrid_readout``). The prompt form hands over the sums of its first N − W keys and its last W keys.

The prompt output is the converted model's own computation: the site module's variant function on the GQA-expanded
keys/values, with the site's scale, options and parameters (so transferred parameters carry over). The step is the
recurrent form of the same formula (:mod:`passes.attention.linear_decode`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from passes.attention import hybrid
from passes.attention.linear import feature_map_side, readout
from passes.attention.linear_core import colsum, noncausal_state
from passes.attention.mala import hybrid_readout
from passes.attention.masks import compute_dtype

#: Options of the linear variant that the feature maps use.
FMAP_OPTIONS = ("feature_map", "feature_dim", "scale_qk")
#: The state tensors of each variant with a decode form, in graph order.
STATE_PARTS: dict[str, tuple[str, ...]] = {"linear": ("S", "z"), "mala": ("S", "z", "v", "n")}
#: The hybrid window's buffers, after the variant's parts.
WINDOW_PARTS: tuple[str, ...] = ("win_k", "win_v", "win_m")


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, N, D) → (B, Hkv·groups, N, D), each KV head repeated for its query heads (as the site module)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class LinearLayerState(nn.Module):
    """Prompt and step forms of one converted attention site.

    Args:
        site_module: the converted site (:class:`rewrite.binding.SiteModule` of the ``linear`` or ``mala``
            variant, optionally with a ``window``): its variant function, scale, options and parameters are used as
            they are.
        heads, kv_heads: query and key/value heads of the layer.
    """

    def __init__(self, site_module: nn.Module, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.fn = site_module.variant.fn
        self.kind = site_module.variant.name
        self.options: dict[str, Any] = dict(site_module.options)
        self.window = int(self.options.get("window", 0) or 0)
        self.parts = STATE_PARTS[self.kind] + (WINDOW_PARTS if self.window else ())
        self.scale = float(site_module.spec.scale)
        self.params = nn.ParameterDict({k: nn.Parameter(v.detach().clone(), requires_grad=False)
                                        for k, v in site_module.params.items()})
        self.heads, self.kv_heads = heads, kv_heads
        self.groups = heads // kv_heads
        self.state_heads = heads if "fmap_k" in self.params else kv_heads

    def _params(self) -> dict[str, torch.Tensor] | None:
        return dict(self.params) if len(self.params) else None

    def _fmap(self) -> dict[str, Any]:
        return dict(scale=self.scale, params=self._params(), **{k: self.options[k] for k in FMAP_OPTIONS
                                                                 if k in self.options})

    def _state_side(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups if self.state_heads == self.heads else 1
        return _expand(k, g), _expand(v, g)

    def _state_of(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, ...]:
        """The sums of the state (:data:`STATE_PARTS`) over the tokens of k/v (B, Hkv, N, D); with ``keep``
        (1, 1, N, 1) of 0/1 over the tokens whose ``keep`` is 1 only."""
        ks, vs = self._state_side(k, v)
        fk = feature_map_side(ks, "k", compute_dtype(ks), **self._fmap())  # (B, Hs, N, F)
        vc = vs.to(fk.dtype)
        if keep is not None:
            fk, vc = fk * keep.to(fk.dtype), vc * keep.to(fk.dtype)
        s, z = noncausal_state(fk, vc)
        if self.kind == "linear":
            return s, z
        ones = torch.ones_like(vc[..., :1]) if keep is None else torch.ones_like(vc[..., :1]) * keep.to(fk.dtype)
        return s, z, colsum(vc), colsum(ones)

    def _window_of(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(keep (1, 1, N, 1): the tokens older than the window, win_k, win_v, win_m) after a prompt k/v (B, Hkv, N,
        D): the last W tokens in the buffer (newest last), empty slots in front (zeros, ``win_m`` 0) when N < W."""
        n, w = k.shape[-2], self.window
        idx = torch.arange(w, device=k.device) + (n - w)  # token of each slot
        valid = (idx >= 0).to(k.dtype)[None, None, :, None]  # (1, 1, W, 1)
        slots = torch.clamp(idx, min=0)
        win_k, win_v = k[:, :, slots] * valid, v[:, :, slots] * valid
        win_m = valid.expand(k.shape[0], 1, w, 1) * 1.0
        keep = (torch.arange(n, device=k.device) < n - w).to(k.dtype)[None, None, :, None]
        return keep, win_k, win_v, win_m

    def prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q (B, H, N, D), k/v (B, Hkv, N, D) → (causal output (B, H, N, E), *state after the N tokens).
        ``causal_form`` ``auto`` is the chunked form (O(N) memory when exported)."""
        opts = dict(self.options)
        y = self.fn(q, _expand(k, self.groups), _expand(v, self.groups), params=self._params(), scale=self.scale,
                    causal=True, key_padding=None, **opts)
        if not self.window:
            return (y, *self._state_of(k, v))
        keep, *win = self._window_of(k, v)
        return (y, *self._state_of(k, v, keep), *win)

    def _token_state(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`_state_of` for one token, written without length-1 reductions: φ(k)ᵀ v is an outer product
        (B, Hs, F, 1)·(B, Hs, 1, E), Σv is v, the count is 1 (the same numbers; TVM's CPU build of an Add fed by a
        MatMul whose reduction has length 1 dropped the Add's other operand — see docs/causal_decode.md)."""
        ks, vs = self._state_side(k, v)
        fk = feature_map_side(ks, "k", compute_dtype(ks), **self._fmap())  # (B, Hs, 1, F)
        vc = vs.to(fk.dtype)
        ds, dz = fk.transpose(-1, -2) * vc, fk.transpose(-1, -2)
        if self.kind == "linear":
            return ds, dz
        return ds, dz, vc, torch.ones_like(vc[..., :1])

    def _shift(self, state: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor
               ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Hybrid: fold the oldest window slot into the sums (if it holds a key), shift the buffers by one and
        append the token k/v (B, Hkv, 1, D) → (new sums, (win_k, win_v, win_m))."""
        n = len(STATE_PARTS[self.kind])
        sums, (bk, bv, bm) = state[:n], state[n:]
        m0 = bm[:, :, :1]  # (B, 1, 1, 1): the oldest slot holds a key
        sums = tuple(a + m0 * b for a, b in zip(sums, self._token_state(bk[:, :, :1], bv[:, :, :1])))
        one = torch.ones_like(m0)
        if self.window == 1:
            return sums, (k.to(bk.dtype), v.to(bv.dtype), one)
        return sums, (torch.cat([bk[:, :, 1:], k.to(bk.dtype)], dim=2),
                      torch.cat([bv[:, :, 1:], v.to(bv.dtype)], dim=2), torch.cat([bm[:, :, 1:], one], dim=2))

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *state: torch.Tensor
             ) -> tuple[torch.Tensor, ...]:
        """One token: q (B, H, 1, D), k/v (B, Hkv, 1, D), the state of the earlier tokens → (y (B, H, 1, E),
        *new state). The token sees itself (the state is updated before the read-out)."""
        if self.window:
            sums, win = self._shift(state, k, v)
        else:
            sums, win = tuple(a + b for a, b in zip(state, self._token_state(k, v))), ()
        cd = compute_dtype(q)
        fq = feature_map_side(q, "q", cd, **self._fmap())  # (B, H, 1, F)
        b, f = fq.shape[0], fq.shape[-1]
        g = self.heads // self.state_heads
        fqg = fq.reshape(b, self.state_heads, g, f)  # query head h reads state head h // g

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, Hs, g, ·) or (B, Hs, 1, ·) → (B, H, 1, ·)
            return x.expand(b, x.shape[1], g, x.shape[-1]).reshape(b, self.heads, 1, x.shape[-1])

        num, den = heads(fqg @ sums[0]), heads(fqg @ sums[1])
        terms = gamma = None
        if self.window:
            bk, bv, bm = win
            qg = q.to(cd).reshape(b, self.kv_heads, self.groups, -1)  # query heads grouped by KV head
            keep = bm.transpose(-1, -2) > 0  # (B, 1, 1, W)
            wn, wd = hybrid.softmax_terms(qg, bk.unsqueeze(2), bv.unsqueeze(2), keep, scale=self.scale)
            terms = (wn.reshape(b, self.heads, 1, -1), wd.reshape(b, self.heads, 1, 1))
            gamma = hybrid.window_gamma(self._params(), self.heads, cd, q.device)
        eps = float(self.options.get("eps", 1e-6))
        if self.kind == "linear":
            y = readout(num, den, eps=eps, window_terms=terms, gamma=gamma)
        else:  # v (B, Hs, 1, E) and n (B, Hs, 1, 1) broadcast over the g query heads of a state head
            y = hybrid_readout(num, den, heads(sums[2]), heads(sums[3]), scale=self.scale, eps=eps,
                               window_terms=terms, gamma=gamma)
        return (y.to(q.dtype), *sums, *win)
