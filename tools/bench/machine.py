"""The CPU a benchmark ran on, in one line, for table headers and result JSON (no TVM import needed).

``describe()`` -> e.g. ``"AMD EPYC (AVX-512, 2 cores, L3 32 MiB)"``: the model name, the widest vector ISA the
kernel reports (``/proc/cpuinfo`` flags), the usable cores and the last-level cache.  Benchmarks on different
machines are not comparable; every table names its CPU with this line.
"""
from __future__ import annotations

import os


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def llc_bytes() -> int:
    """Last-level cache size in bytes (sysfs); 0 when unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for idx in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, idx, "size"), encoding="ascii") as fh:
                txt = fh.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        best = max(best, int(txt.rstrip("KMG")) * mult)
    return best


def describe() -> str:
    """One line naming this machine's CPU (see module docstring)."""
    model, flags = _cpuinfo()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    llc = llc_bytes()
    return f"{model} ({isa}, {len(os.sched_getaffinity(0))} cores" + (f", L3 {llc >> 20} MiB)" if llc else ")")
