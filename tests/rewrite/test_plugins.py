"""Plugins are entry points (pyproject.toml): the engine discovers passes and subcommands without naming them."""
from __future__ import annotations

import importlib.metadata

from rewrite import plugins
from rewrite.cli import build_parser
from rewrite.passes import list_passes


def _subcommands() -> set[str]:
    action = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(action.choices)


def test_checkout_declares_the_groups(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])  # metadata without the groups
    names = {ep.name: ep.value for ep in plugins.entry_points(plugins.COMMAND_GROUP)}
    assert names == {"decode": "passes.decode.cli:add_commands", "demo": "passes.demo:add_commands",
                     "transfer": "passes.transfer.cli:add_commands",
                     "targets": "targets.cli:add_commands"}
    assert [ep.value for ep in plugins.entry_points(plugins.PASS_GROUP)] == ["passes.register:register"]


def test_passes_and_commands_come_from_the_plugins():
    assert {"attention.reference", "attention.linear"} <= set(list_passes())
    assert {"inspect", "convert", "verify", "passes", "demo", "transfer", "compile", "bench",
            "generate"} <= _subcommands()


def test_installed_metadata_wins_and_a_missing_plugin_is_skipped(monkeypatch):
    eps = [importlib.metadata.EntryPoint("mine", f"{__name__}:_add", plugins.COMMAND_GROUP),
           importlib.metadata.EntryPoint("gone", "softswap_no_such_plugin.cli:add_commands", plugins.COMMAND_GROUP)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: eps if group == plugins.COMMAND_GROUP else [])
    assert plugins.load(eps[1]) is None
    commands = _subcommands()
    assert "hello" in commands and "demo" not in commands


def _add(sub) -> None:
    sub.add_parser("hello")
