"""softswap's engine: graph adapters, recognizers, passes, verification, the API and the CLI.

Public API: :func:`inspect`, :func:`convert`, :func:`verify`, :func:`export`, :func:`load_model`.
"""
from .api import convert, export, inspect, verify
from .errors import (ModelLoadError, NoSitesError, OptionError, OutputPathError, SoftswapError,
                     UnsupportedModelError, VerificationError)
from .io import LoadedModel, load_model

__all__ = ["inspect", "convert", "verify", "export", "load_model", "LoadedModel", "SoftswapError",
           "ModelLoadError", "NoSitesError", "OptionError", "OutputPathError", "UnsupportedModelError",
           "VerificationError"]
