"""Opening a file never runs code from it (DESIGN.md principle 7).

A ``.pt2`` archive is a zip whose members torch may unpickle on ``torch.export.load``: pickled weights and
constants (``torch.load(..., weights_only=False)`` inside torch), sample inputs (with a ``weights_only=False``
fallback), opaque constants (``pickle.loads``) and TorchScript objects. A crafted member runs arbitrary code the
moment it is unpickled. Two independent guards keep that from happening:

1. :func:`check_pt2_archive` reads every member *before* torch does. Every pickle stream (plain members and the
   members of nested ``torch.save`` zips) is decoded with :mod:`pickletools` — which executes nothing — and each
   global it imports (``GLOBAL``, ``STACK_GLOBAL``, ``INST``) must be in torch's weights-only allow-list (tensor,
   storage, dtype and rebuild functions). Anything else raises :class:`UnsafeModelError` naming the member and
   the global.
2. :func:`guarded_unpickling` is held around ``torch.export.load``: ``torch.load`` is forced to
   ``weights_only=True``, ``pickle.loads`` in torch's archive reader goes through torch's weights-only unpickler,
   and TorchScript object loading is refused. It catches what a static scan could miss (e.g. protocol-0 pickles).

Both are skipped only when the caller opts in with ``trust_remote_code=True`` (CLI: ``--trust-remote-code``), or
inside :func:`trusting_remote_code`. Transfer checkpoints are read with :func:`load_weights_only`.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import json
import logging
import os
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ModelLoadError, UnsafeModelError

log = logging.getLogger(__name__)

#: Set by :func:`trusting_remote_code` (the CLI's ``--trust-remote-code``); read by every loader.
_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("softswap_trust_remote_code", default=False)

#: Nested zips deeper than this are refused (a zip bomb of zips is not a model).
MAX_DEPTH = 3

_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


@contextlib.contextmanager
def trusting_remote_code(enabled: bool = True) -> Iterator[None]:
    """Within this block loaders skip the pickle checks (only for files whose author you trust)."""
    token = _TRUST.set(bool(enabled))
    try:
        yield
    finally:
        _TRUST.reset(token)


def remote_code_trusted(explicit: bool | None = None) -> bool:
    """``explicit`` when given, else the value set by :func:`trusting_remote_code` (default False)."""
    return _TRUST.get() if explicit is None else bool(explicit)


def allowed_globals() -> frozenset[str]:
    """``module.name`` of every global torch's weights-only unpickler accepts (tensors, storages, dtypes,
    rebuild functions, ``OrderedDict``, ``torch.Size``, ...)."""
    from torch import _weights_only_unpickler as wo
    names = set(wo._get_allowed_globals())  # noqa: SLF001 - the allow-list torch itself enforces
    names.update(wo._get_user_allowed_globals())  # noqa: SLF001
    return frozenset(names)


def pickle_globals(data: bytes) -> list[str]:
    """The globals the first pickle stream in ``data`` would import, in order, without executing it.

    ``STACK_GLOBAL`` operands are resolved from the string pushes (and memo gets) before it; an operand that is not
    a literal string is reported as ``<unresolved>``. Raises ``ValueError`` for a stream that does not decode.
    """
    return _scan_pickle(data)[0]


def _scan_pickle(data: bytes) -> tuple[list[str], int]:
    """(globals of the first pickle stream in ``data``, offset just past its STOP)."""
    found: list[str] = []
    recent: list[Any] = []
    memo: dict[int, Any] = {}
    end = len(data)
    for op, arg, pos in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append(f"{module}.{attr}")
            recent.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
            found.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "<unresolved>")
            recent.append(None)
        elif name in _STRING_OPS:
            recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in _GET_OPS:
            recent.append(memo.get(arg))
        elif name in _PUT_OPS:
            memo[arg] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name == "STOP":
            end = pos + 1
        elif name not in ("MARK", "FRAME", "PROTO"):
            recent.append(None)
    return found, end


def _looks_like_pickle(name: str, data: bytes) -> bool:
    return name.endswith((".pkl", ".pickle")) or data[:1] == b"\x80"


def _scan_bytes(file: Path, member: str, data: bytes, allowed: frozenset[str], depth: int) -> None:
    if data[:4] == b"PK\x03\x04":
        if depth >= MAX_DEPTH:
            raise UnsafeModelError(f"{file}: archive member {member} nests zip archives too deeply")
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                for sub in inner.namelist():
                    body = inner.read(sub)
                    # a torch.save zip unpickles only its *.pkl; its storages (data/N) are raw bytes
                    if sub.endswith((".pkl", ".pickle")) or body[:4] == b"PK\x03\x04":
                        _scan_bytes(file, f"{member}!{sub}", body, allowed, depth + 1)
        except zipfile.BadZipFile as exc:
            raise ModelLoadError(f"{file}: archive member {member} is a corrupt zip ({exc})") from None
        return
    if not _looks_like_pickle(member, data):
        return
    # A torch legacy (non-zip) file is several pickles back to back: scan every one that follows.
    offset = 0
    for _ in range(16):
        try:
            names, end = _scan_pickle(data[offset:])
        except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and friends on garbage
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UnsafeModelError(f"{file}: archive member {member} is not a well-formed pickle ({first}); "
                                   "refusing to load it") from None
        bad = [g for g in names if g not in allowed]
        if bad:
            raise UnsafeModelError(f"{file}: archive member {member} pickles global {bad[0]}, which is not a "
                                   "tensor or storage type; loading it could run code from the file "
                                   "(pass --trust-remote-code / trust_remote_code=True only if you trust its author)")
        offset += end
        if data[offset:offset + 1] != b"\x80":
            return
    raise UnsafeModelError(f"{file}: archive member {member} holds too many pickle streams; refusing to load it")


def _raw_tensor_members(archive: zipfile.ZipFile) -> set[str]:
    """Members the archive's weight / constant configs declare as raw tensor bytes (``use_pickle: false``):
    torch reads those with ``frombuffer``, never unpickles them, and their bytes may look like anything."""
    raw: set[str] = set()
    for name in archive.namelist():
        if not name.endswith(("_weights_config.json", "_constants_config.json")):
            continue
        try:
            config = json.loads(archive.read(name)).get("config", {})
        except (ValueError, AttributeError):
            continue  # an unreadable config declares nothing raw: every member stays subject to the scan
        folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        for entry in config.values() if isinstance(config, dict) else []:
            if isinstance(entry, dict) and entry.get("use_pickle") is False and isinstance(entry.get("path_name"), str):
                raw.add(folder + entry["path_name"])
    return raw


def check_pt2_archive(path: str | os.PathLike[str]) -> None:
    """Refuse a ``.pt2`` whose pickled members import anything but tensor / storage globals.

    Reads the archive only (nothing is unpickled). Members declared raw tensor data by the archive's configs are
    skipped; every other member that is a zip (``torch.save``) or starts like a pickle is decoded. Raises
    :class:`UnsafeModelError` naming the member and the global, or :class:`ModelLoadError` for an unreadable
    archive.
    """
    file = Path(path)
    allowed = allowed_globals()
    try:
        with zipfile.ZipFile(file) as archive:
            raw = _raw_tensor_members(archive)
            for info in archive.infolist():
                if info.is_dir() or info.filename in raw:
                    continue
                _scan_bytes(file, info.filename, archive.read(info), allowed, 0)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{file}: not a readable .pt2 archive ({exc})") from None


class _RefusingPickle:
    """Stands in for the :mod:`pickle` module inside torch's archive reader: ``loads`` is weights-only."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def loads(self, data: bytes, *args: Any, **kwargs: Any) -> Any:
        import torch
        return torch.load(io.BytesIO(data), weights_only=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def guarded_unpickling() -> Iterator[None]:
    """Force every unpickling torch does in this block to be weights-only (see the module docstring).

    Not thread-safe: it patches ``torch.load`` and the archive reader's ``pickle`` for the duration of the block.
    """
    import torch
    from torch.export.pt2_archive import _package

    real_load = torch.load
    real_pickle = _package.pickle
    real_obj = getattr(torch._C, "_pickle_load_obj", None)  # noqa: SLF001

    def weights_only_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def refuse_script_object(*_args: Any, **_kwargs: Any) -> Any:
        raise UnsafeModelError("the archive holds a TorchScript object constant; loading it could run code "
                               "(pass --trust-remote-code / trust_remote_code=True only if you trust its author)")

    torch.load = weights_only_load
    _package.pickle = _RefusingPickle(real_pickle)
    if real_obj is not None:
        torch._C._pickle_load_obj = refuse_script_object  # noqa: SLF001
    try:
        yield
    finally:
        torch.load = real_load
        _package.pickle = real_pickle
        if real_obj is not None:
            torch._C._pickle_load_obj = real_obj  # noqa: SLF001


def load_weights_only(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU: tensors, dicts, lists, numbers and strings only.

    Raises whatever torch raises (``pickle.UnpicklingError`` for a disallowed global); callers wrap it.
    """
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)
