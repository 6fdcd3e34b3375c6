"""An offline English calibration corpus built from the docstrings of Python's own standard library.

Nothing is downloaded and no data ships with the project: the sentences come from the ``.py`` files of the running
interpreter's standard library (``sysconfig.get_paths()["stdlib"]``), parsed with :mod:`ast` (no module is
imported, so nothing runs). Module, class and function docstrings are split into sentences, filtered (length,
mostly letters, no code-like lines) and de-duplicated.

Determinism: for a given Python version the corpus is identical run to run. Sentences are ordered by the SHA-1 of
their text (a fixed pseudo-shuffle), and the split is by hash too: a sentence is *held out* when
``int(sha1, 16) % 10 == 0`` (≈10 %), so calibration and held-out sets never share a sentence.

Further sources built the same way (filter, de-duplication, hash order): installed packages' README / licence prose
(:func:`package_docs_corpus`; mixed with the docstrings into :func:`offline_corpus`, the default calibration text),
and, for evaluation, /usr/share/doc (:func:`system_docs_corpus`), manual pages (:func:`man_pages_corpus`) and GNU
info + Perl pod manuals (:func:`manuals_corpus`).
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


def _metadata_body(text: str) -> str:
    """The description body of a ``METADATA`` / ``PKG-INFO`` file (after the first blank line of headers)."""
    head, sep, body = text.partition("\n\n")
    return body if sep else ""


@lru_cache(maxsize=2)
def package_docs_corpus(exclude_stdlib: bool = True) -> Corpus:
    """A second, disjoint offline corpus: prose of the installed packages' READMEs and licences.

    Sentences come from every installed distribution's ``METADATA`` description (its README as uploaded to the
    registry) and its ``LICENSE*`` / ``COPYING*`` / ``NOTICE*`` files (found through :mod:`importlib.metadata`;
    nothing is imported or run), filtered like the docstring corpus and de-duplicated. With ``exclude_stdlib``
    any sentence that also occurs in :func:`stdlib_corpus` is dropped, so the two sources share no sentence and
    this one can serve as an *out-of-domain* evaluation set for a calibration on the docstrings. Same ordering and
    hash split as :func:`stdlib_corpus`.
    """
    from importlib import metadata

    seen: set[str] = set()
    names = []
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        names.append(dist.metadata.get("Name") or "?")
        texts = []
        for meta_name in ("METADATA", "PKG-INFO"):
            raw = dist.read_text(meta_name)
            if raw:
                texts.append(_metadata_body(raw))
                break
        for f in sorted(dist.files or [], key=str):
            base = Path(str(f)).name.upper()
            if base.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE")) and \
                    not base.endswith((".PY", ".PYC", ".HTML")):
                try:
                    texts.append(Path(dist.locate_file(f)).read_text(encoding="utf-8", errors="replace"))
                except OSError:
                    continue
        for text in texts:
            seen.update(_sentences(text))
    if exclude_stdlib:
        std = stdlib_corpus()
        seen -= set(std.calibration) | set(std.held_out)
    ordered = sorted(seen, key=_hash)
    held = tuple(s for s in ordered if int(_hash(s), 16) % 10 == 0)
    cal = tuple(s for s in ordered if int(_hash(s), 16) % 10 != 0)
    log.info("package-docs corpus from %d distributions: %d calibration + %d held-out sentences", len(names),
             len(cal), len(held))
    return Corpus(calibration=cal, held_out=held, source=f"README/licence prose of {len(names)} installed packages")


@lru_cache(maxsize=2)
def offline_corpus() -> Corpus:
    """The default calibration text: the docstring corpus and the package-prose corpus, interleaved.

    Calibration = stdlib docstrings and installed packages' README/licence prose alternating sentence by sentence
    (each in its own hash order), so any prefix (``max_samples``) holds both registers equally until the shorter
    runs out; held-out = both held-out splits, interleaved the same way. Two registers (technical reference prose,
    and descriptive / legal prose) generalise better to text of a third kind than either alone (docs/transfer.md).
    """
    std, pkg = stdlib_corpus(), package_docs_corpus()

    def mix(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
        n = min(len(a), len(b))
        return tuple(x for pair in zip(a[:n], b[:n]) for x in pair) + a[n:] + b[n:]

    return Corpus(calibration=mix(std.calibration, pkg.calibration), held_out=mix(std.held_out, pkg.held_out),
                  source=f"stdlib docstrings + {pkg.source}")


def _read_doc(path: Path) -> str:
    import gzip
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                return f.read(200_000)
        return path.read_text(encoding="utf-8", errors="replace")[:200_000]
    except (OSError, EOFError):
        return ""


@lru_cache(maxsize=2)
def system_docs_corpus(root: str = "/usr/share/doc") -> Corpus:
    """A third, evaluation-only source: the operating system's package documentation under ``root``.

    Sentences of each package folder's ``copyright``, ``README*``, ``NEWS*`` and ``changelog*`` files (plain or
    gzip), filtered like the other corpora, minus every sentence of :func:`offline_corpus` (calibration and
    held-out), so it shares no sentence with the default calibration text. Empty when ``root`` does not exist (the
    folder is a Debian/Ubuntu convention). Not used for calibration: it is what ``tools/bench/fidelity.py`` scores
    as out-of-domain text.
    """
    seen: set[str] = set()
    base = Path(root)
    names = ("copyright", "README", "README.md", "README.gz", "README.Debian", "NEWS.gz", "NEWS", "changelog.gz")
    folders = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                seen.update(_sentences(_read_doc(folder / name)))
    off = offline_corpus()
    seen -= set(off.calibration) | set(off.held_out)
    ordered = sorted(seen, key=_hash)
    held = tuple(s for s in ordered if int(_hash(s), 16) % 10 == 0)
    cal = tuple(s for s in ordered if int(_hash(s), 16) % 10 != 0)
    return Corpus(calibration=cal, held_out=held, source=f"system package docs under {root} ({len(folders)} folders)")


# ------------------------------------------------------------------------------------------------------------
# Manual pages (a third register) and GNU info / Perl pod manuals (evaluation only).

_ROFF_ESCAPE = re.compile(r"\\f(\(..|\[[^\]]*\]|.)|\\s[-+]?\d|\\\*(\(..|\[[^\]]*\]|.)|\\[&|^%:,/]"
                          r"|\\\(..|\\\[[^\]]*\]")
#: roff macros whose arguments are running text (font changes); their words are kept.
_ROFF_TEXT = frozenset({"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB"})
#: roff requests that start a new paragraph (a sentence never runs across them).
_ROFF_BREAK = frozenset({"PP", "P", "LP", "TP", "TQ", "SH", "SS", "IP", "HP", "TH", "sp", "br", "RS", "RE", "nf",
                         "fi", "EX", "EE"})
#: Manual pages read per page-name prefix (text before the first ``_``/``-``/``.``): keeps a tool that installs
#: thousands of generated pages (e.g. one per sub-command) from dominating the register.
MAN_PAGES_PER_PREFIX = 40


def roff_text(src: str) -> str:
    """Plain paragraphs of a man page's roff source: requests dropped (font-change macros keep their words),
    escapes removed, no-fill (example) blocks left out, paragraphs separated by blank lines. Not a renderer:
    enough to recover the prose sentences."""
    out: list[str] = []
    nofill = False
    for line in src.splitlines():
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            mac = parts[0]
            if mac in ("nf", "EX"):
                nofill = True
            elif mac in ("fi", "EE"):
                nofill = False
            if mac in _ROFF_TEXT and len(parts) > 1 and not nofill:
                words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', parts[1])]
                # alternating-font macros (BR, IR, ...) join their arguments without spaces
                out.append(("" if len(mac) == 2 and mac not in ("SM", "SB") else " ").join(words))
            elif mac in _ROFF_BREAK:
                out.append("")
            continue
        if nofill:
            out.append("")
            continue
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\(em", " - ").replace("\\(aq", "'")
        out.append(_ROFF_ESCAPE.sub("", line))
    return "\n".join(out)


def _man_pages(root: Path, sections: tuple[str, ...]) -> list[Path]:
    pages: list[Path] = []
    for sec in sections:
        folder = root / sec
        if not folder.is_dir():
            continue
        per_prefix: dict[str, int] = {}
        for page in sorted(folder.iterdir()):
            prefix = re.split(r"[_.-]", page.name, maxsplit=1)[0]
            if page.is_file() and per_prefix.get(prefix, 0) < MAN_PAGES_PER_PREFIX:
                per_prefix[prefix] = per_prefix.get(prefix, 0) + 1
                pages.append(page)
    return pages


@lru_cache(maxsize=2)
def man_pages_corpus(root: str = "/usr/share/man", sections: tuple[str, ...] = ("man1", "man5", "man7", "man8")
                     ) -> Corpus:
    """A third register of English: prose sentences of the manual pages under ``root``. Not in the default
    calibration (mixed in as a third register it measured no gain, docs/transfer.md); the fidelity bench scores
    its held-out split as out-of-domain text.

    Reads the roff sources of ``sections`` (plain or gzip; at most ``MAN_PAGES_PER_PREFIX`` pages per name
    prefix), turns them into paragraphs (:func:`roff_text`), then the same sentence filter, de-duplication,
    ordering and hash split as the other corpora, minus every sentence of the docstring and package-prose corpora.
    Imperative, descriptive reference English (\"Print only the byte counts.\"). Empty when ``root`` is missing.
    """
    base = Path(root)
    pages = _man_pages(base, sections) if base.is_dir() else []
    seen: set[str] = set()
    for page in pages:
        seen.update(_sentences(roff_text(_read_doc(page))))
    std, pkg = stdlib_corpus(), package_docs_corpus()
    seen -= set(std.calibration) | set(std.held_out) | set(pkg.calibration) | set(pkg.held_out)
    ordered = sorted(seen, key=_hash)
    held = tuple(s for s in ordered if int(_hash(s), 16) % 10 == 0)
    cal = tuple(s for s in ordered if int(_hash(s), 16) % 10 != 0)
    log.info("man-page corpus from %d pages under %s: %d calibration + %d held-out sentences", len(pages), root,
             len(cal), len(held))
    return Corpus(calibration=cal, held_out=held, source=f"manual pages under {root} ({len(pages)} pages)")


_POD_CODE = re.compile(r"[BICFSLEXZ]<+([^<>]*)>+")


def _pod_text(src: str) -> str:
    """Prose paragraphs of a Perl pod file: ``=`` commands and indented (verbatim) lines dropped, formatting codes
    (``B<...>``, ``L<text|link>``) replaced by their text."""
    text = "\n".join("" if line.startswith(("=", " ", "\t")) else line for line in src.splitlines())
    for _ in range(3):  # nested codes
        text = _POD_CODE.sub(lambda m: m.group(1).split("|")[0], text)
    return text


@lru_cache(maxsize=2)
def manuals_corpus(info_root: str = "/usr/share/info", pod_root: str = "/usr/share/perl") -> Corpus:
    """An evaluation-only source of book-like English: GNU info manuals (``*.info*.gz`` under ``info_root``) and
    Perl's pod documentation (``*.pod`` under ``pod_root``), minus every sentence of the calibration registers
    (docstrings, package prose, man pages) and of :func:`system_docs_corpus`. Never calibrates; every sentence is
    in ``held_out`` (hash order), ``calibration`` is empty."""
    seen: set[str] = set()
    info, pod = Path(info_root), Path(pod_root)
    files = sorted(info.glob("*.gz")) if info.is_dir() else []
    for path in files:
        seen.update(_sentences(_read_doc(path)))
    pods = sorted(pod.rglob("*.pod")) if pod.is_dir() else []
    for path in pods:
        seen.update(_sentences(_pod_text(_read_doc(path))))
    for other in (offline_corpus(), man_pages_corpus(), system_docs_corpus()):
        seen -= set(other.calibration) | set(other.held_out)
    return Corpus(calibration=(), held_out=tuple(sorted(seen, key=_hash)),
                  source=f"GNU info manuals under {info_root} ({len(files)} files) + Perl pod under {pod_root} "
                         f"({len(pods)} files)")
