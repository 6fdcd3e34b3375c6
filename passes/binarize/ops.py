"""BiViT's binarisation operators, written once (spec heads_and_postprocess.md §4).

Every function works on float tensors of any shape (last axis = features / keys) and is differentiable through
its straight-through estimator (STE):

- :func:`sign_pm`: sign with 0 → +1, values exactly {−1, +1} (``torch.sign`` would give a third level 0);
- :func:`sign_ste`: :func:`sign_pm` forward; backward passes the upstream gradient where |x| < 1 and gives 0
  where |x| ≥ 1 (the clipped STE);
- :func:`binary_weight`: W_b = α ⊙ sign(W − mean_row W), one scale α_r per output row (STE through the sign);
- :func:`sab`: softmax-aware binarisation of attention probabilities, B = 1[P ≥ r · max_row P] in {0, 1} (ties at
  the threshold kept, so each row keeps at least its maximum); backward is the gradient of P itself.

The deploy forms (:func:`sign_deploy`, :func:`sab_deploy`) are the same maps spelled as the exported graph must
read them (docs/bivit.md, "contract"): ``where(x >= 0, 1, -1)`` and ``(P >= r · max P).to(float)``.
"""
from __future__ import annotations

import torch


def sign_pm(x: torch.Tensor) -> torch.Tensor:
    """+1 where x ≥ 0, −1 elsewhere (same dtype as ``x``)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return sign_pm(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """:func:`sign_pm` with the clipped straight-through gradient (zero where |x| ≥ 1)."""
    return _SignSTE.apply(x)


def sign_deploy(x: torch.Tensor) -> torch.Tensor:
    """The exported spelling of :func:`sign_pm`: ``where(x >= 0, 1.0, -1.0)`` with scalar constants."""
    return torch.where(x >= 0, 1.0, -1.0)


def centred_sign(weight: torch.Tensor) -> torch.Tensor:
    """sign(W − mean_row W) in {−1, +1} with the STE (rows = output channels, shape (out, in))."""
    return sign_ste(weight - weight.mean(dim=1, keepdim=True))


def init_scale(weight: torch.Tensor) -> torch.Tensor:
    """The initial per-output-channel scale α_r = mean_row |W| (shape (out,)), as the spec initialises it."""
    return weight.detach().abs().mean(dim=1).clone()


def binary_weight(weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """W_b = α ⊙ sign(W − mean_row W): row r takes exactly the values {−α_r, +α_r}. ``alpha`` has shape (out,)."""
    return alpha[:, None] * centred_sign(weight)


def sab_mask(p: torch.Tensor, ratio: float) -> torch.Tensor:
    """1[P ≥ ratio · max_row P] as ``p``'s dtype (no gradient)."""
    return (p >= ratio * p.amax(dim=-1, keepdim=True)).to(p.dtype)


class _SabSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor, ratio: float) -> torch.Tensor:  # type: ignore[override]
        return sab_mask(p, ratio)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def sab(p: torch.Tensor, ratio: float) -> torch.Tensor:
    """Softmax-aware binarisation: forward :func:`sab_mask` (exactly {0, 1}), backward the identity on P (so the
    gradient reaching the scores is exactly the softmax gradient). No re-normalisation of B."""
    return _SabSTE.apply(p, float(ratio))


def sab_deploy(p: torch.Tensor, ratio: float) -> torch.Tensor:
    """The exported spelling of :func:`sab_mask`: ``Cast(GreaterOrEqual(P, r · ReduceMax(P)), float)``."""
    return (p >= p.amax(dim=-1, keepdim=True) * ratio).to(p.dtype)
