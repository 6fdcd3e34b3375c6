"""BiViT modules in two forms: trainable (QAT, straight-through gradients) and deploy (frozen constants, exported
in the contract form of docs/bivit.md).

- :class:`BinaryLinear`: y = (α ⊙ sign(W − mean_row W)) · a + b with a = sign(x) (``binarize_input``, stage
  ``w1a1``) or a = x (stage ``1w32a``). α (shape (out,)) is a parameter initialised from mean_row |W| when the
  module is built — never lazily on a first forward. ``enabled=False`` computes the float linear with the latent
  weight (used by the staged schedule before a part's turn).
- :class:`BinaryAttention`: softmax attention over sign(Q), sign(K), sign(V) whose probabilities are binarised
  softmax-aware (SAB, ratio r); ``enabled=False`` is plain softmax attention.
- ``freeze()`` returns the deploy module: :class:`FrozenBinaryLinear` (constant ±1 weight of shape (out, in),
  constant α (out,), bias) computing ``linear(where(x >= 0, 1, -1), W±1) * α + b``, and
  :class:`FrozenBinaryAttention`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from . import ops


class BinaryLinear(nn.Module):
    """Trainable binary linear. ``weight`` (out, in) is the latent float weight, ``alpha`` (out,) the scales."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], binarize_input: bool,
                 enabled: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float()) if bias is not None else None
        self.alpha = nn.Parameter(ops.init_scale(self.weight))
        self.binarize_input = bool(binarize_input)
        self.enabled = bool(enabled)

    def reset_scale(self) -> None:
        """Re-initialise α from the current latent weight (mean_row |W|), e.g. when a staged schedule turns the
        binarisation of this module on after its weight was trained as a float weight."""
        with torch.no_grad():
            self.alpha.copy_(ops.init_scale(self.weight))

    def binary_weight(self) -> torch.Tensor:
        """α ⊙ sign(W − mean_row W), shape (out, in)."""
        return ops.binary_weight(self.weight, self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        a = ops.sign_ste(x) if self.binarize_input else x
        y = F.linear(a, ops.centred_sign(self.weight)) * self.alpha
        return y + self.bias if self.bias is not None else y

    def freeze(self) -> nn.Module:
        """The deploy module (a plain float linear while ``enabled`` is False)."""
        if not self.enabled:
            return FloatLinear(self.weight.detach(), None if self.bias is None else self.bias.detach())
        with torch.no_grad():
            signs = ops.sign_pm(self.weight - self.weight.mean(dim=1, keepdim=True))
        return FrozenBinaryLinear(signs, self.alpha.detach(), None if self.bias is None else self.bias.detach(),
                                  self.binarize_input)

    def extra_repr(self) -> str:
        return (f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, binarize_input={self.binarize_input}, "
                f"enabled={self.enabled}")


class FrozenBinaryLinear(nn.Module):
    """Deploy binary linear: ``linear(s, W±1) * α (+ b)`` with s = ``where(x >= 0, 1, -1)`` when
    ``binarize_input`` (else s = x). ``signs`` holds exactly ±1.0 (float32, (out, in)); all tensors are buffers
    (constants of the exported program)."""

    def __init__(self, signs: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor],
                 binarize_input: bool) -> None:
        super().__init__()
        if not bool(((signs == 1) | (signs == -1)).all()):
            raise ValueError("FrozenBinaryLinear: signs must hold exactly ±1")
        self.register_buffer("signs", signs.detach().clone().float())
        self.register_buffer("alpha", alpha.detach().clone().float().reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())
        self.binarize_input = bool(binarize_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = ops.sign_deploy(x) if self.binarize_input else x
        y = F.linear(s, self.signs) * self.alpha
        return y + self.bias if self.bias is not None else y


class FloatLinear(nn.Module):
    """A float linear with constant weights (a binary linear whose part was never switched on)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _scores(q: torch.Tensor, k: torch.Tensor, k_transposed: bool) -> torch.Tensor:
    return q @ (k if k_transposed else k.transpose(-2, -1))


class BinaryAttention(nn.Module):
    """Trainable binarised attention core: SAB(softmax(scale · sign(Q) sign(K)ᵀ)) · sign(V).

    Inputs as an attention site binds them (q (..., T, D); k (..., T, D), or (..., D, T) when ``k_transposed``;
    v (..., T, D)); output (..., T, D) like the softmax attention it replaces. No mask (sites with masks are not
    given to this module)."""

    def __init__(self, scale: float, ratio: float, k_transposed: bool = False, enabled: bool = True) -> None:
        super().__init__()
        self.scale = float(scale)
        self.ratio = float(ratio)
        self.k_transposed = bool(k_transposed)
        self.enabled = bool(enabled)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return torch.softmax(_scores(q, k, self.k_transposed) * self.scale, dim=-1) @ v
        p = torch.softmax(_scores(ops.sign_ste(q), ops.sign_ste(k), self.k_transposed) * self.scale, dim=-1)
        return ops.sab(p, self.ratio) @ ops.sign_ste(v)

    def freeze(self) -> nn.Module:
        return FrozenBinaryAttention(self.scale, self.ratio, self.k_transposed, self.enabled)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, ratio={self.ratio}, enabled={self.enabled}"


class FrozenBinaryAttention(nn.Module):
    """Deploy form of :class:`BinaryAttention` (``where`` signs, SAB as a comparison against the row maximum)."""

    def __init__(self, scale: float, ratio: float, k_transposed: bool, enabled: bool = True) -> None:
        super().__init__()
        self.scale, self.ratio, self.k_transposed, self.enabled = float(scale), float(ratio), bool(k_transposed), \
            bool(enabled)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return torch.softmax(_scores(q, k, self.k_transposed) * self.scale, dim=-1) @ v
        p = torch.softmax(_scores(ops.sign_deploy(q), ops.sign_deploy(k), self.k_transposed) * self.scale, dim=-1)
        return ops.sab_deploy(p, self.ratio) @ ops.sign_deploy(v)
