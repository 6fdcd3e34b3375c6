"""Ctrl-C bookkeeping: a SIGINT must end the command, never be swallowed by a retry.

Libraries softswap calls (torch.export, dynamo) sometimes catch ``KeyboardInterrupt`` inside their own machinery
and re-raise it as another exception type; a caller that retries on ``Exception`` would then carry on as if the
user had not pressed Ctrl-C. The CLI's SIGINT handler calls :func:`note_sigint`; code that retries or falls back
after an exception calls :func:`reraise_if_interrupted` first.
"""
from __future__ import annotations

import threading

_SIGINT = threading.Event()


def note_sigint() -> None:
    """Record that SIGINT arrived (called from the CLI's signal handler)."""
    _SIGINT.set()


def reset_sigint() -> None:
    """Forget an earlier SIGINT (start of a command)."""
    _SIGINT.clear()


def interrupted(exc: BaseException | None = None) -> bool:
    """True when SIGINT arrived, or ``exc`` was caused (directly or through its chain) by a KeyboardInterrupt."""
    if _SIGINT.is_set():
        return True
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def reraise_if_interrupted(exc: BaseException | None = None) -> None:
    """Raise ``KeyboardInterrupt`` when :func:`interrupted` says so; otherwise return."""
    if interrupted(exc):
        raise KeyboardInterrupt from exc
