"""Size of a binarised model: binary weights packed 1 bit per weight plus their float32 scales, against float32.

Units are bytes. A binary linear of shape (out, in) stores ``ceil(out · in / 8)`` bytes of packed signs and
``4 · out`` bytes of scales α; its bias stays float32 and is counted with the rest of the float parameters.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np
import torch


def packed_bytes(out_features: int, in_features: int) -> int:
    """Bytes of ``out · in`` signs packed 1 bit each."""
    return math.ceil(out_features * in_features / 8)


def size_report(float_tensors: Iterable[torch.Tensor], binary_shapes: Iterable[tuple[int, int]]) -> dict[str, Any]:
    """``float_tensors``: every parameter/constant of the float model (torch tensors, or anything with a
    ``shape``: ONNX initializers); ``binary_shapes``: (out, in) of each
    binarised weight. Returns bytes of the float model, of the binarised model (float tensors less the binarised
    weights, plus packed signs and scales) and their ratio, and the same for the binary linears alone."""
    float_bytes = sum((int(t.numel()) if hasattr(t, "numel") else int(np.prod(tuple(t.shape), dtype=np.int64))) * 4
                      for t in float_tensors)
    shapes = list(binary_shapes)
    weights = sum(o * i for o, i in shapes)
    packed = sum(packed_bytes(o, i) for o, i in shapes)
    scales = sum(4 * o for o, _ in shapes)
    binarized = float_bytes - 4 * weights + packed + scales
    return {"float_bytes": float_bytes, "binarized_bytes": binarized,
            "ratio": round(float_bytes / binarized, 3) if binarized else None,
            "binary_linears": {"count": len(shapes), "weights": weights, "float_bytes": 4 * weights,
                               "packed_bytes": packed, "scale_bytes": scales,
                               "ratio": round(4 * weights / (packed + scales), 3) if shapes else None}}


def size_lines(size: Mapping[str, Any]) -> list[str]:
    """Human lines for a :func:`size_report`."""
    b = size["binary_linears"]
    return [f"size: {b['count']} binary linears, {b['weights']} weights: {b['float_bytes']} B float32 -> "
            f"{b['packed_bytes']} B packed + {b['scale_bytes']} B scales ({b['ratio']}x); whole model "
            f"{size['float_bytes']} B -> {size['binarized_bytes']} B ({size['ratio']}x)"]
