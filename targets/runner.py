"""Run a compiled artefact: ``Runner(path).run({name: ndarray}) -> {output name: ndarray}``."""

from __future__ import annotations

import logging
import os

import numpy as np

from . import _env  # noqa: F401
from .artifact import load_metadata, requirements
from .cpu import host_description, list_features, missing_features
from .errors import ArtifactError, InputError, UnsupportedHostError
from .shape_ranges import check_in_ranges

log = logging.getLogger(__name__)


def artefact_requirements(meta: dict, culprit: str) -> dict:
    """The ``requires`` record of an artefact's metadata (derived from its target for artefacts written before
    format 2)."""
    if "requires" in meta:
        return meta["requires"]
    try:
        return requirements(meta["target"])
    except Exception as exc:  # noqa: BLE001 - an unreadable target string: refuse rather than guess
        raise ArtifactError(f"cannot tell which CPU this artefact needs (target {meta['target']!r}: "
                            f"{type(exc).__name__})", culprit=culprit) from exc


def check_host(meta: dict, culprit: str, device: str = "cpu") -> None:
    """Refuse (``UnsupportedHostError``) before anything is loaded when this machine cannot execute the artefact:
    CPU features its code needs that the host lacks, or a CUDA artefact without a GPU.  Executing such code would
    kill the process with SIGILL."""
    needs = artefact_requirements(meta, culprit)
    lacking = missing_features(needs.get("cpu_features", []))
    if lacking:
        raise UnsupportedHostError(
            f"this artefact was compiled for {needs.get('cpu') or 'another CPU'} and needs CPU features this host "
            f"({host_description()}) lacks: {list_features(lacking)}; compile it here with --target host", culprit=culprit)
    if device == "cuda":
        import tvm

        if not tvm.cuda(0).exist:
            raise UnsupportedHostError(f"this artefact runs on a CUDA GPU ({needs.get('gpu_arch') or 'cuda'}) and "
                                       "this machine has none; compile it with --target host", culprit=culprit)


class Runner:
    """Loads ``path`` (a library written by :func:`targets.compile_model`) and its metadata sidecar.

    Before the library is loaded, the host is checked against the features the artefact's code requires
    (:func:`check_host`): a CPU without them gets :class:`UnsupportedHostError`, never an illegal instruction.

    ``run`` checks input names, dtypes and static dims against the metadata (symbolic dims accept any size inside
    the ranges the artefact was compiled for, when it records any) and returns numpy arrays keyed by output
    name.  CUDA artefacts need a GPU machine (device 0).
    """

    def __init__(self, path: str | os.PathLike, device: str | None = None):
        import tvm
        from tvm import relax

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ArtifactError(f"no such artefact: {self.path}", culprit=self.path)
        self.meta = load_metadata(self.path)
        kind = device or self.meta.get("device", "cpu")
        check_host(self.meta, self.path, kind)
        try:
            lib = tvm.runtime.load_module(self.path)
            self.dev = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
            self.vm = relax.VirtualMachine(lib, self.dev)
            self._main_fn = self.vm["main"]  # looked up once (a lookup costs tens of microseconds)
        except Exception as exc:  # noqa: BLE001
            raise ArtifactError(f"cannot load artefact: {type(exc).__name__}: {exc}", culprit=self.path) from exc
        self.input_names = [i["name"] for i in self.meta["inputs"]]
        self.output_names = [o["name"] for o in self.meta["outputs"]]

    def _check(self, inputs: dict) -> list:
        import tvm

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise InputError(f"missing input {missing[0]!r}; expected {self.input_names}", culprit=missing[0])
        extra = sorted(set(inputs) - set(self.input_names))
        if extra:
            raise InputError(f"unknown input {extra[0]!r}; expected {self.input_names}", culprit=extra[0])
        args = []
        for spec in self.meta["inputs"]:
            name = spec["name"]
            arr = np.asarray(inputs[name])
            if str(arr.dtype) != spec["dtype"]:
                raise InputError(f"input {name!r} has dtype {arr.dtype}, expected {spec['dtype']}", culprit=name)
            shape = spec["shape"]
            ok = len(shape) == arr.ndim and all(not isinstance(d, int) or d == s for d, s in zip(shape, arr.shape))
            if not ok:
                raise InputError(f"input {name!r} has shape {list(arr.shape)}, expected {shape}", culprit=name)
            check_in_ranges(self.meta.get("ranges"), name, arr.shape)
            args.append(tvm.runtime.tensor(np.ascontiguousarray(arr), self.dev))
        return args

    def run(self, inputs: dict) -> dict:
        """Run once; ``inputs`` maps every input name to a numpy array of the recorded dtype and shape."""
        out = self._main_fn(*self._check(inputs))
        outs = list(out) if not hasattr(out, "numpy") else [out]
        if len(outs) != len(self.output_names):
            log.warning("artefact returned %d outputs, metadata lists %d", len(outs), len(self.output_names))
        names = self.output_names + [f"output_{i}" for i in range(len(self.output_names), len(outs))]
        return {n: o.numpy() for n, o in zip(names, outs)}

    def prepare(self, inputs: dict):
        """Convert inputs once (for benchmarking); returns a zero-argument callable running the model."""
        args = self._check(inputs)
        f = self._main_fn

        def call():
            r = f(*args)
            if self.dev.dlpack_device_type() != 1:
                self.dev.sync()
            return r

        return call
