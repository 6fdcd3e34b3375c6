"""Which graph ops each canonical kind stands for, read from the adapters' op tables (for listings only).

The adapters map ops to :class:`~rewrite.graph.base.Canon` records with small functions; the kinds a function can
produce are read from its closure (``_simple("matmul")``) or from the ``Canon("kind", ...)`` calls in its source.
Used by ``softswap inspect --spellings``; recognition never calls it.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable

_CANON_CALL = re.compile(r"Canon\(\s*\"(\w+)\"")


def _kinds_of(fn: Callable[..., Any]) -> set[str]:
    kinds: set[str] = set()
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, str) and value.isidentifier():
            kinds.add(value)
    try:
        kinds.update(_CANON_CALL.findall(inspect.getsource(fn)))
    except (OSError, TypeError):
        pass
    return kinds


@functools.lru_cache(maxsize=None)
def _index(graph_kind: str) -> dict[str, tuple[str, ...]]:
    if graph_kind == "fx":
        from . import fx
        table = {str(op): fn for op, fn in fx._TABLE.items()}
    else:
        from . import onnx_graph
        table = {(f"{dom}::" if dom else "") + op: fn for (dom, op), fn in onnx_graph._TABLE.items()}
    out: dict[str, list[str]] = {}
    for op, fn in table.items():
        for kind in _kinds_of(fn):
            out.setdefault(kind, []).append(op)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def ops_of_kind(graph_kind: str, kind: str) -> tuple[str, ...]:
    """The ops of ``graph_kind`` ("fx" or "onnx") the adapter reads as canonical ``kind`` (empty if none)."""
    return _index(graph_kind).get(kind, ())
