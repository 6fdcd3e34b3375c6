"""Plugin discovery: passes and subcommands come from entry points, so the engine never names its plugins.

Two entry-point groups (declared in ``pyproject.toml``):

- ``softswap.passes``: a callable taking no argument that registers passes with :func:`rewrite.passes.register_pass`;
- ``softswap.commands``: a callable ``add_commands(subparsers)`` that adds ``softswap`` subcommands.

When the installed distribution's metadata does not declare a group (a source checkout used without reinstalling,
or an install made before the group existed), the groups are read from the ``pyproject.toml`` next to the
package, so a checkout behaves as its installed form would.
"""
from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PASS_GROUP = "softswap.passes"
COMMAND_GROUP = "softswap.commands"


def _from_pyproject(group: str) -> list[importlib.metadata.EntryPoint]:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        return []
    import tomllib
    try:
        table = tomllib.loads(pyproject.read_text()).get("project", {}).get("entry-points", {}).get(group, {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.warning("cannot read entry points from %s: %s", pyproject, exc)
        return []
    return [importlib.metadata.EntryPoint(name, value, group) for name, value in table.items()]


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The entry points of ``group``: installed metadata first, else the source checkout's ``pyproject.toml``."""
    found = list(importlib.metadata.entry_points(group=group))
    return sorted(found or _from_pyproject(group), key=lambda ep: ep.name)


def load(ep: importlib.metadata.EntryPoint) -> Any | None:
    """The object an entry point names, or None when its package is not installed (an optional plugin)."""
    module = ep.value.split(":", 1)[0].strip()
    try:
        return ep.load()
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            log.info("plugin %s (%s) is not installed", ep.name, ep.value)
            return None
        raise
