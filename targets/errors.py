"""Typed errors of the lowering package.  Every error names its culprit (a target, a node, a file, an input)."""

from __future__ import annotations

from rewrite.errors import ModelLoadError, SoftswapError


class TargetError(SoftswapError):
    """Base class of every error raised by ``targets``.  ``culprit`` names what caused it (may be None)."""

    def __init__(self, message: str, culprit: str | None = None):
        super().__init__(message if culprit is None else f"{message} [culprit: {culprit}]")
        self.culprit = culprit


class UnknownTargetError(TargetError):
    """A target name that is not in the table (``targets.table.TARGETS``)."""


class LoweringLoadError(TargetError, ModelLoadError):
    """The model file or object could not be read for lowering (missing file, bad protobuf, unknown object type);
    an engine :class:`~rewrite.errors.ModelLoadError` too, with the culprit named."""


class UnsupportedOpError(TargetError):
    """A node the frontends cannot lower (e.g. ONNX TopK with dynamic k, ``linalg.inv``); culprit = node name."""


class ImportFailedError(TargetError):
    """A TVM frontend failed on the (normalized) graph."""


class CompileError(TargetError):
    """TVM compilation or export failed."""


class RemoteTuningError(TargetError):
    """The RPC tracker of remote tuning is unreachable or has no server under the device key; culprit = HOST:PORT."""


class ArtifactError(TargetError):
    """A compiled artefact or its metadata sidecar is missing or inconsistent."""


class UnsupportedHostError(ArtifactError):
    """This machine cannot execute the code of an artefact or target (missing CPU features, no GPU); culprit = the
    artefact or target."""


class InputError(TargetError):
    """Runner inputs do not match the artefact's metadata (name, shape or dtype); culprit = input name."""
