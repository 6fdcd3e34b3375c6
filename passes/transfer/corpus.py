"""An offline English calibration corpus built from the docstrings of Python's own standard library.

Nothing is downloaded and no data ships with the project: the sentences come from the ``.py`` files of the running
interpreter's standard library (``sysconfig.get_paths()["stdlib"]``), parsed with :mod:`ast` (no module is
imported, so nothing runs). Module, class and function docstrings are split into sentences, filtered (length,
mostly letters, no code-like lines) and de-duplicated.

Determinism: for a given Python version the corpus is identical run to run. Sentences are ordered by the SHA-1 of
their text (a fixed pseudo-shuffle), and the split is by hash too: a sentence is *held out* when
``int(sha1, 16) % 10 == 0`` (≈10 %), so calibration and held-out sets never share a sentence.
"""
from __future__ import annotations

import ast
import hashlib
import logging
import os
import re
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

#: Folders of the standard library that are skipped (tests, vendored packages, IDE).
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "idlelib",
                       "__pycache__", "ensurepip", "turtledemo", "tkinter"})
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODEY = re.compile(r"(>>>|::|\{|\}|==|\(\)|\w\(|\[\w*\]|\w_\w|\w\.\w|--|\$|#|\|)")


@dataclass(frozen=True)
class Corpus:
    """Calibration sentences and held-out sentences (disjoint), each in a fixed order."""

    calibration: tuple[str, ...]
    held_out: tuple[str, ...]
    source: str


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
    return out


def _sentences(doc: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", doc):
        text = " ".join(para.split())
        for sent in _SPLIT.split(text):
            sent = sent.strip()
            if not (40 <= len(sent) <= 240) or not sent[0].isupper() or sent[-1] not in ".!?":
                continue
            letters = sum(c.isalpha() or c == " " for c in sent)
            if letters < 0.9 * len(sent) or _CODEY.search(sent) or len(sent.split()) < 6:
                continue
            out.append(sent)
    return out


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@lru_cache(maxsize=2)
def stdlib_corpus(stdlib: str | None = None) -> Corpus:
    """The docstring corpus of the standard library at ``stdlib`` (default: this interpreter's).

    Returns a :class:`Corpus`; about 10 % of the sentences are held out (hash split, see module docstring).
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                for doc in _docstrings(Path(dirpath) / name):
                    seen.update(_sentences(doc))
    ordered = sorted(seen, key=_hash)
    held = tuple(s for s in ordered if int(_hash(s), 16) % 10 == 0)
    cal = tuple(s for s in ordered if int(_hash(s), 16) % 10 != 0)
    log.info("stdlib corpus from %s: %d calibration + %d held-out sentences", root, len(cal), len(held))
    return Corpus(calibration=cal, held_out=held, source=str(root))


def write_lines(sentences: tuple[str, ...] | list[str], path: str | os.PathLike[str]) -> Path:
    """Write ``sentences`` one per line (the text-file calibration format) and return the path."""
    out = Path(path)
    out.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return out
