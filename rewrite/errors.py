"""Typed errors. Every error names the file, node or option at fault; the CLI maps them to exit code 2."""
from __future__ import annotations


class SoftswapError(Exception):
    """Base of every error softswap raises on purpose."""


class ModelLoadError(SoftswapError):
    """A model file or folder could not be read (names the path and what was wrong)."""


class UnsupportedModelError(SoftswapError):
    """A model loaded but cannot be processed as asked (names the node or input)."""


class NoSitesError(SoftswapError):
    """A rewrite was asked for but the model has no site it could apply to; nothing was written."""


class OptionError(SoftswapError):
    """A pass, variant or CLI option is unknown or has a bad value (names the option)."""


class OutputPathError(SoftswapError):
    """The output path cannot be written (missing folder, unknown suffix, same as the input)."""


class VerificationError(SoftswapError):
    """Two models could not be compared (names the input or output that does not match)."""
