"""Session fixtures for the model zoo (tests/zoo.py) and its cached exports."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_TESTS = Path(__file__).resolve().parent

def _load_zoo():
    """Load tests/zoo.py as the module ``zoo`` without putting tests/ on sys.path (tests/rewrite, tests/passes
    and tests/targets would otherwise shadow the real packages)."""
    import importlib.util
    if "zoo" in sys.modules:
        return sys.modules["zoo"]
    spec = importlib.util.spec_from_file_location("zoo", _TESTS / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = module
    spec.loader.exec_module(module)
    return module


_zoo = _load_zoo()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real-model or long-running tests (select with -m slow)")
    config.addinivalue_line("markers", "avx512: executes AVX-512 code; skipped (with the reason) on a host without "
                                       "avx512f")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that execute AVX-512 code are skipped, and counted as skipped, where the CPU cannot run it (running it
    would kill the whole session with SIGILL).  Compile-only checks are not marked and run everywhere."""
    marked = [item for item in items if item.get_closest_marker("avx512")]
    if not marked:
        return
    from targets.cpu import has_avx512, host_description

    if has_avx512():
        return
    skip = pytest.mark.skip(reason=f"executes AVX-512 code; this host ({host_description()}) has no avx512f")
    for item in marked:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def zoo() -> list[_zoo.ZooModel]:
    """All zoo entries (tests/zoo.py)."""
    return _zoo.ZOO


@pytest.fixture(scope="session")
def zoo_cache_dir() -> Path:
    """On-disk export cache (``tests/.cache/zoo/torch-<ver>``, or ``$SOFTSWAP_ZOO_CACHE``)."""
    return _zoo.cache_dir()


@pytest.fixture(scope="session")
def zoo_fx(zoo_cache_dir: Path) -> Callable[[str], Any]:
    """``name -> ExportedProgram``, exported once (disk-cached .pt2) and memoized per session."""
    memo: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in memo:
            memo[name] = _zoo.export_fx(_zoo.get(name))
        return memo[name]

    return get


@pytest.fixture(scope="session")
def zoo_onnx(zoo_cache_dir: Path) -> Callable[[str, str], Path]:
    """``(name, exporter) -> ONNX path`` for exporter "dynamo" or "legacy" (disk-cached)."""
    memo: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str = "dynamo") -> Path:
        key = (name, exporter)
        if key not in memo:
            memo[key] = _zoo.export_onnx(_zoo.get(name), exporter)
        return memo[key]

    return get
