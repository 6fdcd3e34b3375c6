"""A file cache of the offline calibration corpora, so the default text is built once per machine, not per run.

Building :func:`passes.transfer.corpus.offline_corpus` parses every standard-library ``.py`` file and reads every
installed package's README and licence (7–13 s on a quiet 2-core host, more under load), on every transfer and on
every rank of a distributed one. The result depends only on the builder's code, the interpreter and the installed
packages, so it is stored as JSON under ``$SOFTSWAP_CACHE_DIR/corpus`` (default ``~/.cache/softswap/corpus``) and
keyed by the SHA-1 of: the cache format, the corpus name, the source text of :mod:`passes.transfer.corpus`, the
Python version and standard-library path, and the sorted (name, version) of every installed distribution. Any change
to one of them makes a new key (a rebuild); a file that cannot be read or does not hold a corpus is rebuilt too, and
a cache folder that cannot be written only costs the rebuild next time. ``SOFTSWAP_CORPUS_CACHE=0`` turns the cache
off. Files are written atomically (:mod:`rewrite.atomic`), so ranks building the same corpus at once cannot tear it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
from pathlib import Path
from typing import Callable

from .corpus import Corpus

log = logging.getLogger(__name__)

CACHE_FORMAT = "softswap-corpus/1"
ENV_DIR = "SOFTSWAP_CACHE_DIR"
ENV_SWITCH = "SOFTSWAP_CORPUS_CACHE"


def cache_dir() -> Path:
    """``$SOFTSWAP_CACHE_DIR/corpus`` or ``~/.cache/softswap/corpus``."""
    root = os.environ.get(ENV_DIR) or str(Path.home() / ".cache" / "softswap")
    return Path(root) / "corpus"


def _distributions() -> list[tuple[str, str]]:
    from importlib import metadata
    return sorted({((d.metadata.get("Name") or "?").lower(), d.version or "?") for d in metadata.distributions()})


def corpus_key(name: str) -> str:
    """The cache key of corpus ``name`` on this interpreter with these packages and this builder code."""
    from . import corpus as builder
    h = hashlib.sha1()
    for part in (CACHE_FORMAT, name, Path(builder.__file__).read_text(encoding="utf-8"), sys.version,
                 sysconfig.get_paths()["stdlib"], json.dumps(_distributions())):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _read(path: Path) -> Corpus | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT:
            return None
        cal, held, source = data["calibration"], data["held_out"], data["source"]
        if not (isinstance(cal, list) and isinstance(held, list) and isinstance(source, str)
                and all(isinstance(s, str) for s in cal + held)):
            return None
        return Corpus(calibration=tuple(cal), held_out=tuple(held), source=source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def cached_corpus(name: str, build: Callable[[], Corpus]) -> Corpus:
    """Corpus ``name`` from the cache file when it holds one for the current key; else ``build()`` it and store it.

    Never raises for cache trouble (unreadable or foreign file, read-only folder): it builds instead.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return build()
    path = cache_dir() / f"{name}-{corpus_key(name)}.json"
    found = _read(path) if path.is_file() else None
    if found is not None:
        log.info("%s corpus from the cache %s", name, path)
        return found
    corpus = build()
    try:
        from rewrite.atomic import write_text
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"format": CACHE_FORMAT, "name": name, "calibration": list(corpus.calibration),
                                     "held_out": list(corpus.held_out), "source": corpus.source}))
        log.info("%s corpus cached in %s", name, path)
    except OSError as exc:
        log.debug("%s corpus not cached (%s)", name, exc)
    return corpus
