"""Atomic output: a file appears complete at its path or not at all (DESIGN.md principle 5).

Every output is written to a hidden temporary sibling, ``.<name>.softswap-tmp-<pid>-<random>``, and moved over the
output path with ``os.replace`` once complete. An exception or Ctrl-C removes the temporary file. A process killed
outright (SIGKILL, power loss) cannot clean up: its temporary file stays, hidden and never at the output path, and
the next softswap run that writes into the same folder removes it (:func:`clean_stale`: temporaries whose writing
process is gone).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

TAG = ".softswap-tmp-"
_STALE = re.compile(r"^\..+\.softswap-tmp-(\d+)-[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries left in ``folder`` by softswap processes that no longer exist; returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match or _alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
            log.info("removed %s, left by an interrupted softswap run", entry)
        except OSError:
            pass
    return removed


def temp_sibling(path: Path, directory: bool = False) -> Path:
    """A new hidden temporary file (or folder) beside ``path``, named so :func:`clean_stale` recognizes it."""
    prefix = f".{path.name}{TAG}{os.getpid()}-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def _naming(target: Path) -> Iterator[None]:
    """An OS error while writing (read-only file system, disk full, permissions) as :class:`OutputPathError`
    naming the output."""
    from .errors import OutputPathError
    try:
        yield
    except OSError as exc:
        raise OutputPathError(f"{target}: cannot write the output ({exc.strerror or type(exc).__name__})") from exc


def _remove(tmp: Path) -> None:
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    except OSError:  # cleaning up must not hide the error that got us here
        log.warning("could not remove the temporary %s", tmp)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on normal exit it replaces ``path``; on any exception (Ctrl-C included)
    it is removed and ``path`` is left as it was. OS errors while writing raise :class:`OutputPathError`."""
    target = Path(path)
    clean_stale(target.parent)
    with _naming(target):
        tmp = temp_sibling(target)
    try:
        with _naming(target):
            yield tmp
            os.replace(tmp, target)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``path``; on normal exit every file in it is moved beside ``path``
    (side files first, the file named like ``path`` last, so a reader never sees the new model with old side
    files); on any exception the folder is removed."""
    target = Path(path)
    clean_stale(target.parent)
    with _naming(target):
        tmp = temp_sibling(target, directory=True)
    try:
        with _naming(target):
            yield tmp
            items = sorted(tmp.iterdir(), key=lambda p: p.name == target.name)
            for item in items:
                os.replace(item, target.parent / (target.name if item.name == target.name else item.name))
    finally:
        _remove(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)
