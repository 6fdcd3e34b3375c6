"""The input pre-processing variant of the Mahalanobis score (Lee et al. 2018, §2.2), torch only.

For each layer ℓ: ĉ = argmin_c d²_{ℓ,c}(x); g = sign(∇_x ½ d²_{ℓ,ĉ}(x)), divided per input channel by ``input_std``
when the model normalizes its inputs; x̃_ℓ = x − ε g (a step that makes x look more in-distribution for that layer,
which helps in-distribution inputs more than OOD ones); M_ℓ(x̃_ℓ) = max_c −d²_{ℓ,c}(x̃_ℓ). The layer scores are
combined with the detector's weights into ood_score (higher = more likely OOD). ε = 0 gives the plain score.

It needs input gradients, so it runs on the torch side only (an ``nn.Module``, a softswap FX ``LoadedModel`` or an
``fx.GraphModule``); the exported graphs carry the plain score. ``detector.taps`` are node names of the FX program
the pass fitted on; an ``nn.Module`` is exported with ``torch.export`` to find them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from rewrite.errors import OptionError

from .detector import MahalanobisDetector


class _Taps(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: dict[str, int]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.seen: dict[int, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.seen[self.wanted[n.name]] = out
        return out


def _graph_module(model: Any, example: torch.Tensor) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    if getattr(model, "kind", None) == "fx" and getattr(model, "ep", None) is not None:
        return model.ep.module()
    if getattr(model, "kind", None) == "onnx":
        raise OptionError("ood pre-processing needs input gradients: it runs on the torch path (an nn.Module or an "
                          "FX program), not on an ONNX model")
    if isinstance(model, torch.nn.Module):
        dyn = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)
        return torch.export.export(model.eval(), (example,), dynamic_shapes=dyn, strict=False).module()
    raise OptionError(f"ood pre-processing: expected an nn.Module, an FX LoadedModel or an fx.GraphModule, got "
                      f"{type(model).__name__}")


def preprocess(model: Any, detector: MahalanobisDetector, x: np.ndarray | torch.Tensor, eps: float = 0.002,
               input_std: Sequence[float] | None = None, batch: int = 256) -> np.ndarray:
    """ood_score (N,) float64 of inputs ``x`` (one input tensor, samples on axis 0) with one gradient step of size
    ``eps`` per layer (see the module docstring). Higher = more likely out-of-distribution.

    ``model``: the model the detector was fitted on (``nn.Module``, FX ``LoadedModel`` or ``fx.GraphModule``).
    Raises :class:`OptionError` when a tap node is not in the program or ``eps`` is negative."""
    if eps < 0:
        raise OptionError(f"ood pre-processing: eps={eps} must be >= 0")
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    gm = _graph_module(model, x[: min(len(x), 4)])
    names = {n.name for n in gm.graph.nodes}
    missing = [t for t in detector.taps if t not in names]
    if missing:
        raise OptionError(f"ood pre-processing: tap nodes {missing} are not in the program (the detector was fitted "
                          "on another export of the model)")
    scorer = detector.module()
    std = None
    if input_std is not None:
        std = torch.as_tensor(input_std, dtype=x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
    out = []
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        layer_scores = []
        for i, node in enumerate(detector.taps):
            xi = xb.detach().clone().requires_grad_(eps > 0)
            with torch.set_grad_enabled(eps > 0):
                rec = _Taps(gm, {node: 0})
                rec.run(xi)
                d2 = scorer.distances(i, rec.seen[0])
                if eps > 0:
                    half = 0.5 * d2.gather(1, d2.argmin(1, keepdim=True)).sum()
                    grad = torch.autograd.grad(half, xi)[0].sign()
                    if std is not None:
                        grad = grad / std
                    with torch.no_grad():
                        rec = _Taps(gm, {node: 0})
                        rec.run((xb - eps * grad).detach())
                        d2 = scorer.distances(i, rec.seen[0])
            layer_scores.append((-d2.amin(-1)).detach())
        scores = torch.stack(layer_scores, 1).numpy()
        out.append(detector.weights.ood_score(scores))
    return np.concatenate(out)
