"""Typed errors. Every error names the file, node or option at fault; the CLI maps them to exit code 2."""
from __future__ import annotations


class SoftswapError(Exception):
    """Base of every error softswap raises on purpose."""


class ModelLoadError(SoftswapError):
    """A model file or folder could not be read (names the path and what was wrong)."""


class UnsafeModelError(ModelLoadError):
    """A model or checkpoint file holds pickled code (names the file, the archive member and the global); it was
    refused before anything was unpickled. ``trust_remote_code=True`` / ``--trust-remote-code`` overrides."""


class DependencyError(SoftswapError):
    """A dependency (onnxruntime, TVM, torch.export, transformers) failed on a model softswap handed it: the
    message names the file or node and keeps the dependency's first line."""


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


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first non-empty line of the message`` of a dependency's exception, cut at ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    # onnxruntime prefixes "[ONNXRuntimeError] : 1 : FAIL : ..."; keep the message, not the code soup
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
