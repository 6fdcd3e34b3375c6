"""Decode export of causal LMs converted to linear attention: prefill + step ONNX graphs with per-layer recurrent
state as named inputs/outputs (:func:`export_decode`), and greedy generation with them (:func:`generate`)."""
from .export import MANIFEST, export_decode
from .generate import DecodeSession, GenerateError, generate

__all__ = ["MANIFEST", "export_decode", "DecodeSession", "GenerateError", "generate"]
