"""Out-of-distribution inputs for the digits CNN (tests/digits_models.py): natural images shipped inside scikit-image,
cut to 8×8 patches and scaled like the digits (float32 (N, 1, 8, 8) in [0, 1], each patch stretched to the full
range as the digits' strokes are).

- ``lfw``: the 200 faces of ``skimage.data.lfw_subset()`` (25×25 in [0, 1]), each resized to 8×8;
- ``textures``: camera, coins, moon, page, text, brick, grass, gravel, cell, clock, each resized so that its short
  side is 64 pixels, then cut into non-overlapping 8×8 patches.

Flat patches (range < 0.1 before stretching) are dropped: they carry no content for either class of inputs.
"""
from __future__ import annotations

import functools

import numpy as np

TEXTURES = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "cell", "clock")


def _stretch(patches: np.ndarray) -> np.ndarray:
    lo = patches.min(axis=(1, 2), keepdims=True)
    hi = patches.max(axis=(1, 2), keepdims=True)
    keep = (hi - lo).reshape(-1) >= 0.1
    out = (patches - lo) / np.maximum(hi - lo, 1e-12)
    return out[keep]


@functools.lru_cache(maxsize=None)
def lfw_patches() -> np.ndarray:
    """The 200 lfw_subset faces resized to 8×8, float32 (N, 1, 8, 8) in [0, 1]."""
    from skimage.data import lfw_subset
    from skimage.transform import resize
    faces = lfw_subset()
    small = np.stack([resize(face, (8, 8), anti_aliasing=True) for face in faces])
    return _stretch(small).astype(np.float32)[:, None]


@functools.lru_cache(maxsize=None)
def texture_patches() -> np.ndarray:
    """Non-overlapping 8×8 patches of scikit-image's shipped photographs, float32 (N, 1, 8, 8) in [0, 1]."""
    import skimage.data as data
    from skimage.transform import resize
    out = []
    for name in TEXTURES:
        img = getattr(data, name)().astype(np.float64)
        img = (img - img.min()) / max(img.max() - img.min(), 1e-12)
        h, w = img.shape
        scale = 64 / min(h, w)
        img = resize(img, (int(round(h * scale)) // 8 * 8, int(round(w * scale)) // 8 * 8), anti_aliasing=True)
        blocks = img.reshape(img.shape[0] // 8, 8, img.shape[1] // 8, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
        out.append(blocks)
    return _stretch(np.concatenate(out)).astype(np.float32)[:, None]


def ood_inputs() -> np.ndarray:
    """All OOD inputs: :func:`lfw_patches` then :func:`texture_patches`."""
    return np.concatenate([lfw_patches(), texture_patches()])
