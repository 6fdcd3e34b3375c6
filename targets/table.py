"""Named targets as data, and the host's own target.

``TARGETS`` maps a name to a JSON-able TVM target dict.  Two names are resolved on this host:

* ``host`` — what this CPU can run: LLVM's own host CPU name with any ISA feature of that model the host lacks
  switched off (:func:`targets.cpu.host_target_dict`); an AMD Zen 3 gets ``znver3`` (AVX2 code).
* ``avx512`` — AVX-512 code, a valid cross-compilation target on any host: ``znver4`` when this host is an AMD CPU,
  ``skylake-avx512`` with ``-prefer-256-bit`` (so LLVM's vectorizer uses zmm) otherwise.  Artefacts record the
  features their code needs, and nothing executes one on a CPU without them (:mod:`targets.runner`).

``get_target(name)`` returns a ``tvm.target.Target``.
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
def host_vendor() -> str:
    """``"amd"``, ``"intel"`` or ``"other"``, as LLVM reads CPUID."""
    from tvm.target import codegen

    vendor = str(codegen.llvm_get_system_x86_vendor()).lower()
    return vendor if vendor in ("amd", "intel") else "other"


def _avx512_dict() -> dict:
    return copy.deepcopy(TARGETS["avx512-amd" if host_vendor() == "amd" else "avx512-intel"])


def _host_dict() -> dict:
    from .cpu import host_target_dict

    return copy.deepcopy(host_target_dict())


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


def missing_on_host(target) -> list[str]:
    """The ISA features the CPU code of ``target`` (name, dict or Target) needs and this host lacks."""
    from .cpu import missing_features, required_features

    return missing_features(required_features(get_target(target)))


def ensure_executable(target) -> None:
    """Raise :class:`~targets.errors.UnsupportedHostError` naming the missing features when this host cannot run
    CPU code built for ``target`` (name, dict or Target): executing it would die with SIGILL."""
    from .cpu import host_description, list_features
    from .errors import UnsupportedHostError

    lacking = missing_on_host(target)
    if lacking:
        raise UnsupportedHostError(f"this host ({host_description()}) cannot execute code for target {target!s}: it "
                                   f"lacks {list_features(lacking)}; use --target host", culprit=str(target))
