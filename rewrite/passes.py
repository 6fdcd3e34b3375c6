"""Pass infrastructure: :class:`Pass`, :class:`PassResult`, :class:`PassManager` and the name registry.

Passes register by name (``register_pass``). Plugins declare a registration function in the ``softswap.passes``
entry-point group, which :func:`discover` calls once (:mod:`rewrite.plugins`), so the engine never names them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import OptionError
from .io import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) model, whether it changed, and its report (JSON-able)."""

    model: LoadedModel
    modified: bool
    report: dict[str, Any] = field(default_factory=dict)


class Pass:
    """A named graph transformation with options and pre/post-conditions.

    Subclasses set ``name``, ``description``, ``options`` (name → (default, help)), and implement :meth:`run`.
    ``requires``/``ensures`` name the conditions (``"graph:fx"``, ``"graph:onnx"``, ``"attention:rewritten"``) a
    pass needs and establishes. The manager checks ``requires`` before running a pass (a ``graph:`` condition
    against the model, any other against what earlier passes ensured) and, after it, the ``graph:`` conditions it
    ensures against the model it returned.
    """

    name: str = ""
    description: str = ""
    options: Mapping[str, tuple[Any, str]] = {}
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()

    def run(self, model: LoadedModel) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, model: LoadedModel) -> PassResult:
        return self.run(model)


_REGISTRY: dict[str, tuple[Callable[..., Pass], str, Mapping[str, tuple[Any, str]]]] = {}
_DISCOVERED = False


def register_pass(name: str, factory: Callable[..., Pass], description: str,
                  options: Mapping[str, tuple[Any, str]] | None = None) -> None:
    """Register a pass factory under ``name`` (later registrations replace earlier ones)."""
    _REGISTRY[name] = (factory, description, dict(options or {}))


def discover() -> None:
    """Call every ``softswap.passes`` entry point once, so the plugins register their passes."""
    global _DISCOVERED
    if not _DISCOVERED:
        from .plugins import PASS_GROUP, entry_points, load
        _DISCOVERED = True
        for ep in entry_points(PASS_GROUP):
            register = load(ep)
            if register is not None:
                register()


_EXPORTERS: dict[str, Callable[..., Any]] = {}


def register_exporter(name: str, exporter: Callable[..., Any]) -> None:
    """Register a whole-model exporter (e.g. ``decode``: causal LM -> prefill + step graphs) under ``name``; the
    engine's API calls it through :func:`get_exporter` and never imports the plugin that provides it."""
    _EXPORTERS[name] = exporter


def get_exporter(name: str) -> Callable[..., Any]:
    """The exporter registered as ``name``; :class:`OptionError` when no plugin provides it."""
    discover()
    if name not in _EXPORTERS:
        raise OptionError(f"no exporter {name!r} is installed (registered: {', '.join(sorted(_EXPORTERS)) or 'none'})")
    return _EXPORTERS[name]


def list_passes() -> dict[str, dict[str, Any]]:
    """Every registered pass: description and options (default, help)."""
    discover()
    return {name: {"description": desc, "options": {k: {"default": d, "help": h} for k, (d, h) in opts.items()}}
            for name, (_, desc, opts) in sorted(_REGISTRY.items())}


def get_pass(name: str, **kwargs: Any) -> Pass:
    """Instantiate the pass registered as ``name``; :class:`OptionError` names an unknown pass."""
    discover()
    if name not in _REGISTRY:
        raise OptionError(f"unknown pass {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0](**kwargs)


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    report: dict[str, Any]


class PassManager:
    """Runs passes in order with timing; optionally dumps the graph after each pass into ``dump_dir``."""

    def __init__(self, passes: list[Pass], dump_dir: str | Path | None = None) -> None:
        self.passes = passes
        self.dump_dir = Path(dump_dir) if dump_dir else None

    def run(self, model: LoadedModel) -> tuple[LoadedModel, list[PassRecord]]:
        records = []
        ensured: set[str] = set()
        for index, p in enumerate(self.passes):
            for cond in p.requires:
                if cond.startswith("graph:"):
                    if cond.split(":", 1)[1] != model.kind:
                        raise OptionError(f"pass {p.name!r} requires a {cond.split(':', 1)[1]} graph, got {model.kind}")
                elif cond not in ensured:
                    raise OptionError(f"pass {p.name!r} requires {cond!r}, which no earlier pass of the pipeline "
                                      f"ensures (ensured: {sorted(ensured) or 'nothing'})")
            start = time.perf_counter()
            result = p.run(model)
            seconds = time.perf_counter() - start
            for cond in p.ensures:
                if cond.startswith("graph:") and cond.split(":", 1)[1] != result.model.kind:
                    raise RuntimeError(f"pass {p.name!r} ensures a {cond.split(':', 1)[1]} graph but returned "
                                       f"{result.model.kind}")
            ensured.update(c for c in p.ensures if not c.startswith("graph:"))
            log.info("pass %s: modified=%s in %.2fs", p.name, result.modified, seconds)
            records.append(PassRecord(p.name, result.modified, seconds, result.report))
            model = result.model
            if self.dump_dir is not None:
                self._dump(model, index, p.name)
        return model, records

    def _dump(self, model: LoadedModel, index: int, name: str) -> None:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        target = self.dump_dir / f"{index:02d}-{name}.txt"
        if model.kind == "fx":
            target.write_text(str(model.ep.graph))
        else:
            target.write_text(str(model.onnx))
