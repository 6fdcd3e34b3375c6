"""What a CPU can execute, and what a compiled CPU target needs — both as LLVM sees them.

Feature names are LLVM's (``avx2``, ``avx512f``, ``sse4.1`` ...).  The host's features come from LLVM's own host
query (``llvm::sys::getHostCPUFeatures``, CPUID plus the OS's XSAVE state, exposed by TVM), so a VM that hides
AVX-512 behind a Zen 4 model name reads as having no AVX-512.  A target's features are LLVM's feature list of its
``mcpu`` after its ``mattr`` edits; of those, only the instruction-set extensions that LLVM's code generator can
emit on its own (vector ISAs, BMI, FMA, ...) count as *required*: tuning flags and system instructions (``mwaitx``,
``rdpru``, ``pku`` ...) are never emitted by compiled models, and KVM guests often hide them.

Contracts:

* :func:`host_features` — the ISA features this host can execute (a frozenset of LLVM names).
* :func:`required_features` — sorted ISA features a CPU target's code may use.
* :func:`missing_features` — the required features a host lacks (empty: safe to execute).
* :func:`host_target_dict` — the target for this CPU: LLVM's host CPU name, with every ISA feature of that model the
  host lacks switched off (``-avx512f`` ...), so its code always runs here.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable

from . import _env  # noqa: F401  (sets TVM_NUM_THREADS before tvm is imported)

log = logging.getLogger(__name__)

#: Instruction-set extensions LLVM's code generator may use without intrinsics, by exact name ...
_ISA_EXACT = frozenset({
    "sse", "sse2", "sse3", "ssse3", "sse4.1", "sse4.2", "sse4a", "avx", "avx2", "fma", "fma4", "xop", "f16c",
    "bmi", "bmi2", "lzcnt", "popcnt", "movbe", "cmov", "cx8", "cx16", "tbm", "gfni", "avxvnni", "avxifma",
    "avxneconvert", "avxvnniint8", "avxvnniint16",
})
#: ... and by prefix (every AVX-512 and AVX10 subset, AMX).
_ISA_PREFIXES = ("avx512", "avx10", "amx-")

#: The features that decide the vector width of the code we generate (checked first in messages).
VECTOR_FEATURES = ("avx512f", "avx2", "fma", "avx")


def is_isa_feature(name: str) -> bool:
    """True for an instruction-set extension that compiled model code may contain."""
    return name in _ISA_EXACT or name.startswith(_ISA_PREFIXES)


def _llvm_host_map() -> dict[str, bool]:
    import tvm  # noqa: F401  (loads libtvm, which registers the LLVM queries)
    import tvm_ffi

    return {str(k): bool(v) for k, v in dict(tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()).items()}


@functools.lru_cache(maxsize=1)
def host_cpu_name() -> str:
    """LLVM's name of this CPU (``znver3``, ``sapphirerapids`` ...; ``generic`` when LLVM does not know it)."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


#: Environment variable narrowing the host's features (comma-separated LLVM names), to see what softswap does on a
#: smaller CPU (``SOFTSWAP_HOST_FEATURES=avx,avx2,fma,...``).  It is intersected with what the CPU has, so it can
#: only remove features: code for a feature the CPU lacks is never executed because of it.
HOST_FEATURES_ENV = "SOFTSWAP_HOST_FEATURES"


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """The instruction-set extensions this host can execute (LLVM names), narrowed by ``$SOFTSWAP_HOST_FEATURES``."""
    feats = frozenset(k for k, v in _llvm_host_map().items() if v and is_isa_feature(k))
    narrowed = os.environ.get(HOST_FEATURES_ENV)
    if narrowed is not None:
        feats = feats & frozenset(f.strip() for f in narrowed.split(",") if f.strip())
        log.info("host features narrowed by $%s to %s", HOST_FEATURES_ENV, sorted(feats))
    return feats


@functools.lru_cache(maxsize=1)
def host_model_name() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` model name), for benchmark tables; LLVM's name otherwise."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return host_cpu_name()


def host_description() -> str:
    """One line naming this CPU for benchmark tables: model name, LLVM name and its widest vector ISA."""
    feats = host_features()
    isa = "AVX-512" if "avx512f" in feats else "AVX2" if "avx2" in feats else "SSE/AVX"
    return f"{host_model_name()} ({host_cpu_name()}, {isa})"


def _llvm_target(target):
    """The llvm part of a target (the host part of a CUDA target), or None for a target without one."""
    import tvm

    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if str(tgt.kind.name) == "llvm":
        return tgt
    host = tgt.host
    return host if host is not None and str(host.kind.name) == "llvm" else None


def target_features(target) -> frozenset[str]:
    """Every LLVM feature (ISA and tuning) the llvm part of ``target`` enables; empty for a target without one."""
    from tvm.target import codegen

    tgt = _llvm_target(target)
    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(tgt)) if tgt is not None else frozenset()


def required_features(target) -> list[str]:
    """The sorted ISA features the CPU code of ``target`` (a Target, dict or JSON string) may use."""
    return sorted(f for f in target_features(target) if is_isa_feature(f))


def missing_features(required: Iterable[str], host: Iterable[str] | None = None) -> list[str]:
    """The features of ``required`` that ``host`` (default: this CPU) lacks, the vector ones first."""
    have = frozenset(host_features() if host is None else host)
    missing = [f for f in required if f not in have]
    return sorted(missing, key=lambda f: (f not in VECTOR_FEATURES, VECTOR_FEATURES.index(f)
                                          if f in VECTOR_FEATURES else 0, f))


def list_features(features: list[str], shown: int = 6) -> str:
    """``"avx512f, avx512bw, ... and N more"``: the first ``shown`` features of a list, for one-line messages."""
    more = len(features) - shown
    return ", ".join(features[:shown]) + (f" and {more} more" if more > 0 else "")


def has_avx512(host: Iterable[str] | None = None) -> bool:
    """True when the host (default: this CPU) executes AVX-512F code."""
    return "avx512f" in frozenset(host_features() if host is None else host)


@functools.lru_cache(maxsize=1)
def host_target_dict() -> dict:
    """The llvm target dict for this CPU (see module docstring); a fresh copy per call is made by the caller."""
    import tvm
    from tvm.target import codegen

    name = host_cpu_name()
    triple = str(codegen.llvm_get_system_triple())
    if not name or name == "generic" or not codegen.llvm_is_valid_cpu(name, triple):
        # LLVM does not know this model: name the baseline and switch on what the host has
        feats = host_features()
        mattr = [f"+{f}" for f in sorted(feats) if f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                                                            "avx512dq", "avx512vl", "avx512cd")]
        log.info("LLVM does not name this CPU (%r); host target x86-64 with %s", name, mattr)
        return {"kind": "llvm", "mcpu": "x86-64", **({"mattr": mattr} if mattr else {})}
    model = target_features(tvm.target.Target({"kind": "llvm", "mcpu": name}))
    lacking = sorted(f for f in model if is_isa_feature(f) and f not in host_features())
    mattr = [f"-{f}" for f in lacking]
    if "prefer-256-bit" in model and "avx512f" not in lacking:
        mattr.append("-prefer-256-bit")  # let LLVM's vectorizer use zmm registers, as the avx512 targets do
    if lacking:
        log.info("host CPU %s lacks %s of its model's features: switched off in the host target", name, lacking)
    return {"kind": "llvm", "mcpu": name, **({"mattr": mattr} if mattr else {})}
