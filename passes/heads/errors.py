"""Typed errors of the head catalogue (all :class:`rewrite.errors.SoftswapError`, one line, naming the culprit)."""
from __future__ import annotations

from rewrite.errors import OptionError, UnsupportedModelError


class HeadShapeError(UnsupportedModelError):
    """A head cannot take this replacement because of its shape (e.g. a Z-loss head with K = 2 classes)."""


class ClassOrderError(OptionError):
    """A Fourier head was asked for on classes with no stated order (or an order that is not a permutation)."""
