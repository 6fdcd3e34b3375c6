"""One layer's linear attention in its two decode forms: over a prompt (output + state) and one token (RNN step).

The state of a ``linear`` layer is S = Σ_j φ(k_j) v_jᵀ (B, Hs, F, E) and z = Σ_j φ(k_j) (B, Hs, F, 1), summed over
every token seen so far; a ``mala`` layer adds v = Σ_j v_j (B, Hs, 1, E) and n = the token count (B, Hs, 1, 1),
which MALA's read-out needs (y = (s/n) φ(q)ᵀS (1 + 1/(s/n φ(q)·z + ε)) − (s/n) φ(q)·z · v/n). Hs is the number of KV
heads (GQA kept: the query heads of a group read their KV head's state) unless the key feature map has
per-query-head parameters (Hedgehog ``fmap_k`` after GQA expansion), then Hs = H. Its size depends on neither the
position nor the context length.

The prompt output is the converted model's own computation: the site module's variant function on the GQA-expanded
keys/values, with the site's scale, options and parameters (so transferred parameters carry over). The step is the
recurrent form of the same formula (:mod:`passes.attention.linear_decode`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from passes.attention.linear import feature_map_side
from passes.attention.linear_decode import prefill_state
from passes.attention.linear_core import colsum
from passes.attention.mala import mala_readout
from passes.attention.masks import compute_dtype

#: Options of the linear variant that the decode forms understand; others (``window``) are refused by the caller.
FMAP_OPTIONS = ("feature_map", "feature_dim", "scale_qk")
#: The state tensors of each variant with a decode form, in graph order.
STATE_PARTS: dict[str, tuple[str, ...]] = {"linear": ("S", "z"), "mala": ("S", "z", "v", "n")}


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, N, D) → (B, Hkv·groups, N, D), each KV head repeated for its query heads (as the site module)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class LinearLayerState(nn.Module):
    """Prompt and step forms of one converted attention site.

    Args:
        site_module: the converted site (:class:`rewrite.binding.SiteModule` of the ``linear`` variant): its
            variant function, scale, options and parameters are used as they are.
        heads, kv_heads: query and key/value heads of the layer.
    """

    def __init__(self, site_module: nn.Module, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.fn = site_module.variant.fn
        self.kind = site_module.variant.name
        self.parts = STATE_PARTS[self.kind]
        self.scale = float(site_module.spec.scale)
        self.options: dict[str, Any] = dict(site_module.options)
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

    def _state_of(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The state parts summed over the tokens of k/v (B, Hkv, N, D)."""
        ks, vs = self._state_side(k, v)
        s, z = prefill_state(ks, vs, **self._fmap())
        if self.kind == "linear":
            return s, z
        vc = vs.to(s.dtype)
        return s, z, colsum(vc), colsum(torch.ones_like(vc[..., :1]))

    def prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q (B, H, N, D), k/v (B, Hkv, N, D) → (causal output (B, H, N, E), *state after the N tokens).
        ``causal_form`` ``auto`` means ``chunked`` here (O(N) memory when exported; the same numbers)."""
        opts = dict(self.options)
        if opts.get("causal_form", "auto") == "auto":  # the prefill runs in onnxruntime: the O(N)-memory form
            opts["causal_form"] = "chunked"
        y = self.fn(q, _expand(k, self.groups), _expand(v, self.groups), params=self._params(), scale=self.scale,
                    causal=True, key_padding=None, **opts)
        return (y, *self._state_of(k, v))

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

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *state: torch.Tensor
             ) -> tuple[torch.Tensor, ...]:
        """One token: q (B, H, 1, D), k/v (B, Hkv, 1, D), the state of the earlier tokens → (y (B, H, 1, E),
        *new state). The token sees itself (the state is updated before the read-out)."""
        new = tuple(a + b for a, b in zip(state, self._token_state(k, v)))
        fq = feature_map_side(q, "q", compute_dtype(q), **self._fmap())  # (B, H, 1, F)
        b, f = fq.shape[0], fq.shape[-1]
        g = self.heads // self.state_heads
        fqg = fq.reshape(b, self.state_heads, g, f)  # query head h reads state head h // g
        eps = float(self.options.get("eps", 1e-6))
        if self.kind == "linear":
            y = (fqg @ new[0]) / (fqg @ new[1] + eps)
        else:  # v (B, Hs, 1, E) and n (B, Hs, 1, 1) broadcast over the g query heads of a state head
            y = mala_readout(fqg @ new[0], fqg @ new[1], new[2], new[3], scale=self.scale, eps=eps)
        return (y.reshape(b, self.heads, 1, -1).to(q.dtype), *new)

