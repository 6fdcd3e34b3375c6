"""The layers' dependency contract (DESIGN.md): ``rewrite`` imports neither ``passes`` nor ``targets``, and
``targets`` never imports ``passes``. Checked on the source (import statements and ``importlib.import_module`` /
``__import__`` calls with a literal name), so a violating import fails ``make test``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> packages it must not import
FORBIDDEN = {"rewrite": ("passes", "targets"), "targets": ("passes",)}


def imported_names(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source`` (relative imports are inside the package)."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def violations(package: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for line, name in imported_names(path.read_text(), str(path)):
            top = name.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(root)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_one_way(package):
    assert violations(package) == []


def test_contract_catches_a_violating_import(tmp_path):
    (tmp_path / "rewrite").mkdir()
    (tmp_path / "rewrite" / "bad.py").write_text(
        "import os\nfrom passes.attention import VARIANTS\n"
        "def f():\n    import importlib\n    return importlib.import_module('targets.cli')\n")
    assert violations("rewrite", tmp_path) == ["rewrite/bad.py:2 imports passes.attention",
                                               "rewrite/bad.py:5 imports targets.cli"]
