"""Named targets as data, and host CPU detection.

``TARGETS`` maps a name to a JSON-able TVM target dict; ``avx512`` and ``host`` are resolved against the host CPU
(AMD -> ``znver4``; Intel -> ``skylake-avx512`` with ``-prefer-256-bit``, spec pitfall 13, so LLVM's auto-vectorizer
uses zmm).  ``get_target(name)`` returns a ``tvm.target.Target``.
"""

from __future__ import annotations

import copy
import functools
import logging

from . import _env  # noqa: F401
from .errors import UnknownTargetError

log = logging.getLogger(__name__)

#: Fixed, host-independent targets.
TARGETS: dict[str, dict] = {
    "avx2": {"kind": "llvm", "mcpu": "haswell"},
    "avx512-amd": {"kind": "llvm", "mcpu": "znver4"},
    "avx512-intel": {"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["-prefer-256-bit"]},
    "cuda-sm80": {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm", "mcpu": "haswell"}},
    "cuda-sm90": {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm", "mcpu": "haswell"}},
}
#: Names resolved on the host: name -> function of the CPU description returning a target dict.
ALIASES = ("avx512", "host")


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """Vendor (``"amd"``/``"intel"``/``"other"``) and ISA flags of the host, from /proc/cpuinfo."""
    vendor, flags = "other", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    v = line.split(":", 1)[1].strip()
                    vendor = "amd" if "AMD" in v else "intel" if "Intel" in v else "other"
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:  # pragma: no cover - non-Linux
        log.warning("cannot read /proc/cpuinfo; assuming a generic x86-64 host")
    return {"vendor": vendor, "flags": flags}


def _avx512_dict() -> dict:
    return copy.deepcopy(TARGETS["avx512-amd" if cpu_info()["vendor"] == "amd" else "avx512-intel"])


def _host_dict() -> dict:
    flags = cpu_info()["flags"]
    if "avx512f" in flags:
        return _avx512_dict()
    if "avx2" in flags:
        return copy.deepcopy(TARGETS["avx2"])
    return {"kind": "llvm"}


def target_names() -> list[str]:
    """All accepted target names."""
    return sorted(TARGETS) + list(ALIASES)


def target_dict(name: str) -> dict:
    """The JSON-able dict of a named target (aliases resolved on this host).  Raises UnknownTargetError."""
    if name == "avx512":
        return _avx512_dict()
    if name == "host":
        return _host_dict()
    if name in TARGETS:
        return copy.deepcopy(TARGETS[name])
    raise UnknownTargetError(f"unknown target {name!r}; known: {', '.join(target_names())}", culprit=name)


def get_target(name_or_target):
    """``tvm.target.Target`` for a name of the table, a dict, or a Target (returned as is)."""
    import tvm

    if isinstance(name_or_target, tvm.target.Target):
        return name_or_target
    if isinstance(name_or_target, dict):
        return tvm.target.Target(name_or_target)
    return tvm.target.Target(target_dict(str(name_or_target)))


def is_cuda(target) -> bool:
    """True for a CUDA target."""
    return str(target.kind.name) == "cuda"
