"""Checkpoint shards of a distributed transfer: one file per rank, keyed by site, mergeable with any world size.

A transfer checkpoint ``ckpt.pt`` is one ``torch.save`` dict ``{"format", "meta", "sites": {site: state}}``. Under
:mod:`torch.distributed` rank ``r`` writes its progress to ``ckpt.pt.rank<r>`` (the same format, holding the states
it knows), never to ``ckpt.pt`` itself, so ranks never write the same file. Reading a checkpoint merges ``ckpt.pt``
and every ``ckpt.pt.rank*`` shard **by site**, keeping the state with the most finished steps: the per-site fit is
a pure function of (seed, site index, step) (:mod:`.fit`), so a site's state at step ``s`` is the same whichever rank
computed it, and a checkpoint written by N ranks resumes under any other number of ranks (1 included).

When a run finishes (or a single-process run has folded the shards into ``ckpt.pt``), the shards are removed.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

_SHARD = re.compile(r"\.rank(\d+)$")


def shard_path(path: str | os.PathLike[str], rank: int) -> Path:
    """The shard file rank ``rank`` writes for checkpoint ``path`` (``<path>.rank<rank>``)."""
    p = Path(path)
    return p.with_name(f"{p.name}.rank{int(rank)}")


def shard_files(path: str | os.PathLike[str]) -> list[Path]:
    """Existing shard files of checkpoint ``path``, ordered by rank."""
    p = Path(path)
    if not p.parent.is_dir():
        return []
    found = []
    for entry in p.parent.iterdir():
        if entry.name.startswith(p.name + ".rank"):
            m = _SHARD.search(entry.name)
            if m and entry.name == f"{p.name}.rank{m.group(1)}" and entry.is_file():
                found.append((int(m.group(1)), entry))
    return [e for _, e in sorted(found)]


def remove_shards(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the shard files of ``path`` (after their states were folded into ``path``); returns them."""
    removed = []
    for entry in shard_files(path):
        try:
            entry.unlink()
            removed.append(entry)
        except OSError as exc:  # another process removed it first
            log.debug("could not remove %s: %s", entry, exc)
    return removed
