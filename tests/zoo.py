"""A zoo of real attention architectures (and non-attention twins) for tests.

Every entry is a :class:`ZooModel`: a seeded, tiny, eval-mode model, example
inputs, optional ``torch.export`` dynamic shapes, and the *expected* attention
sites (scale, causality, mask kind, heads, kv heads, head dim) that a
recognizer should report. Negative twins (``expected == []``) carry an
``expected_reason`` keyword saying why they must not be recognized.

Export helpers (:func:`export_fx`, :func:`export_onnx`) cache their results on
disk under ``tests/.cache/zoo/<torch version>/`` (the folder ignores itself
via its own ``.gitignore``), keyed by entry name, torch/transformers versions
and a hash of the entry's builder source, so edits invalidate stale files.

Mask kinds: ``"none"``, ``"key_padding"`` (per-key validity from a padding
mask), ``"causal"``, ``"additive"`` (arbitrary float mask input),
``"boolean"`` (arbitrary bool mask input), ``"causal+padding"``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

log = logging.getLogger(__name__)

ZOO_VERSION = "1"
MaskKind = Literal["none", "key_padding", "causal", "additive", "boolean", "causal+padding"]
MASK_KINDS: tuple[str, ...] = ("none", "key_padding", "causal", "additive", "boolean", "causal+padding")
EXPORTERS: tuple[str, ...] = ("fx", "dynamo", "legacy")
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "zoo"

B, S, E, H = 2, 8, 32, 4  # default batch, sequence, embed dim, heads for hand-written blocks


# --------------------------------------------------------------------------- #
# Data model
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Site:
    """One expected attention site."""

    scale: float
    causal: bool
    mask: MaskKind
    heads: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.mask not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {self.mask!r}")


def sites(n: int, **kw: Any) -> list[Site]:
    """``n`` identical sites (one per layer)."""
    return [Site(**kw) for _ in range(n)]


@dataclass
class Built:
    """What a builder returns."""

    module: nn.Module
    args: tuple[Any, ...]
    dynamic_shapes: Any = None
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    make_inputs: Callable[[int, int], tuple[Any, ...]] | None = None
    decompose: bool = False  # export_fx returns ``run_decompositions()`` of the program (core ATen)


@dataclass
class ZooModel:
    """A zoo entry.

    Attributes:
        name: unique id (also the cache key prefix).
        builder: zero-arg function returning a :class:`Built`.
        expected: expected attention sites (empty for non-attention models).
        classifier_heads: number of classification heads (0 if none).
        expected_reason: for negative twins, the keyword why it is not attention.
        unsupported: exporter -> reason, for exporters known not to handle it.
        static: exporter -> reason, for exporters whose output only runs at the example shapes.
        tags: free-form tags ("hf", "negative", "slow", "classifier", ...).
        notes: how the mask/scale are spelled in the exported graphs.
    """

    name: str
    builder: Callable[[], Built]
    expected: list[Site]
    classifier_heads: int = 0
    expected_reason: str | None = None
    unsupported: dict[str, str] = field(default_factory=dict)
    static: dict[str, str] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    notes: str = ""
    _built: Built | None = field(default=None, repr=False, compare=False)

    # -- building ----------------------------------------------------------
    def built(self) -> Built:
        if self._built is None:
            torch.manual_seed(0)
            self._built = self.builder()
            self._built.module.eval()
        return self._built

    def build(self) -> tuple[nn.Module, tuple[Any, ...], Any]:
        """(eval module, example inputs tuple, dynamic_shapes or None); memoized."""
        b = self.built()
        return b.module, b.args, b.dynamic_shapes

    def inputs(self, batch: int, seq: int) -> tuple[Any, ...] | None:
        """Inputs of another shape (only for entries with dynamic shapes)."""
        b = self.built()
        return None if b.make_inputs is None else b.make_inputs(batch, seq)

    def eager(self, args: Sequence[Any] | None = None) -> list[torch.Tensor]:
        module, ex, _ = self.build()
        with torch.no_grad():
            return flat_outputs(module(*(ex if args is None else args)))

    # -- metadata ----------------------------------------------------------
    @property
    def negative(self) -> bool:
        return self.expected_reason is not None

    @property
    def exporters(self) -> tuple[str, ...]:
        """Exporters expected to work on this entry."""
        return tuple(e for e in EXPORTERS if e not in self.unsupported)

    @property
    def slow(self) -> bool:
        return "slow" in self.tags

    def cache_key(self) -> str:
        import transformers

        src = inspect.getsource(self.builder)
        h = hashlib.sha1(
            "|".join([ZOO_VERSION, self.name, torch.__version__, transformers.__version__, src]).encode()
        ).hexdigest()[:10]
        return f"{self.name}-{h}"


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """Flatten a model output (tensor / tuple / ModelOutput) into a list of tensors."""
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


# --------------------------------------------------------------------------- #
# Hand-written blocks
# --------------------------------------------------------------------------- #
def _dims(batch: bool = True, seq: bool = True) -> tuple[Dim | None, Dim | None]:
    return (Dim("batch", min=1, max=64) if batch else None, Dim("seq", min=2, max=128) if seq else None)


class MHAKeyPadding(nn.Module):
    """nn.MultiheadAttention, batch_first, key_padding_mask (bool, True = pad), need_weights=False."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


def _padding_bool(batch: int, seq: int) -> torch.Tensor:
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(1, batch):
        pad[row, max(seq // 2, seq - row * max(1, seq // 4)) :] = True
    return pad


def build_mha_key_padding() -> Built:
    bd, sd = _dims()
    mk = lambda b, s: (torch.randn(b, s, E), _padding_bool(b, s))  # noqa: E731
    return Built(
        MHAKeyPadding(), mk(B, S), ({0: bd, 1: sd}, {0: bd, 1: sd}), ["x", "key_padding_mask"], ["out"], mk
    )


class MHACausalFloat(nn.Module):
    """nn.MultiheadAttention, seq-first, float -inf upper-triangle attn_mask, need_weights=True (explicit path)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[0]
        mask = torch.triu(torch.full((s, s), float("-inf"), device=x.device), diagonal=1)
        out, _weights = self.attn(x, x, x, attn_mask=mask, need_weights=True)
        return out


def build_mha_causal_float() -> Built:
    bd, sd = _dims()
    mk = lambda b, s: (torch.randn(s, b, E),)  # noqa: E731
    return Built(MHACausalFloat(), mk(B, S), ({0: sd, 1: bd},), ["x"], ["out"], mk)


class MHACausalBool(nn.Module):
    """nn.MultiheadAttention, batch_first, bool causal attn_mask (True = masked), need_weights=False."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(diagonal=1)
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


def build_mha_causal_bool() -> Built:
    bd, sd = _dims()
    mk = lambda b, s: (torch.randn(b, s, E),)  # noqa: E731
    return Built(MHACausalBool(), mk(B, S), ({0: bd, 1: sd},), ["x"], ["out"], mk)


def build_transformer_encoder() -> Built:
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    bd, sd = _dims()
    mk = lambda b, s: (torch.randn(b, s, E),)  # noqa: E731
    return Built(enc, mk(B, S), ({0: bd, 1: sd},), ["x"], ["out"], mk)


class SDPABlock(nn.Module):
    """q/k/v/o projections around F.scaled_dot_product_attention."""

    def __init__(self, mode: str, scale: float | None = None) -> None:
        super().__init__()
        self.mode, self.scale = mode, scale
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, H, E // H).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.mode == "causal", scale=self.scale
        )
        b, _, s, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(b, s, E))


def _sdpa_built(mode: str, scale: float | None = None) -> Built:
    bd, sd = _dims()

    def mk(b: int, s: int) -> tuple[torch.Tensor, ...]:
        x = torch.randn(b, s, E)
        if mode == "additive":
            m = torch.zeros(b, 1, s, s)
            m[:, :, :, s - 2 :] = -1e4  # last two keys strongly down-weighted
            m += 0.1 * torch.randn(b, 1, s, s)  # plus a relative-position style bias
            return (x, m)
        if mode == "boolean":
            keep = torch.ones(b, 1, s, s, dtype=torch.bool)
            keep[1:, :, :, s - 3 :] = False  # True = attend
            return (x, keep)
        return (x,)

    args = mk(B, S)
    names = ["x"] + (["mask"] if len(args) == 2 else [])
    dyn = ({0: bd, 1: sd},) + (({0: bd, 2: sd, 3: sd},) if len(args) == 2 else ())
    return Built(SDPABlock(mode, scale), args, dyn, names, ["out"], mk)


def build_sdpa_causal() -> Built:
    return _sdpa_built("causal")


def build_sdpa_additive() -> Built:
    return _sdpa_built("additive")


def build_sdpa_bool() -> Built:
    return _sdpa_built("boolean")


def build_sdpa_scale03() -> Built:
    return _sdpa_built("none", 0.3)


def build_sdpa_decomposed() -> Built:
    """SDPA with a bool mask, exported and lowered to core ATen by ``run_decompositions()``: 3-D bmm between
    batch-merged views, and ``_safe_softmax``'s where-guard (fully masked rows give 0)."""
    built = _sdpa_built("boolean")
    built.decompose = True
    return built


class TimmViTAttention(nn.Module):
    """timm ``Attention``: fused qkv, permute(2,0,3,1,4), explicit q @ k^T * scale, softmax, dropout, @ v."""

    def __init__(self, dim: int = E, num_heads: int = H) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class TimmViTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = TimmViTAttention()
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def build_timm_vit_block() -> Built:
    bd, sd = _dims()
    mk = lambda b, s: (torch.randn(b, s, E),)  # noqa: E731
    return Built(TimmViTBlock(), mk(B, S + 1), ({0: bd, 1: sd},), ["x"], ["out"], mk)


# --------------------------------------------------------------------------- #
# Negative twins: explicit attention with one thing wrong (square dims so they run)
# --------------------------------------------------------------------------- #
NS = 8  # heads == seq == head_dim == 8 so wrong permutations still type-check


class ExplicitTwin(nn.Module):
    """Explicit attention on (B, NS, NS, NS) q/k/v with a configurable defect."""

    def __init__(self, defect: str) -> None:
        super().__init__()
        self.defect = defect
        self.qkv = nn.Linear(NS * NS, 3 * NS * NS)
        self.register_buffer("elem_scale", torch.rand(NS, NS) * 0.5)

    def forward(self, x: torch.Tensor) -> Any:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, NS, NS).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, D)
        if self.defect == "k_permuted":
            scores = q @ k.permute(0, 2, 3, 1) * NS**-0.5  # (B,S,D,H): mixes heads with queries
        elif self.defect == "tensor_scale":
            scores = (q @ k.transpose(-2, -1)) * self.elem_scale
        else:
            scores = (q @ k.transpose(-2, -1)) * NS**-0.5
        dim = -2 if self.defect == "softmax_axis" else -1
        probs = scores.softmax(dim=dim)
        if self.defect == "no_matmul":
            return (probs * v).sum(-1)  # elementwise gate, no P @ V
        out = probs @ v
        if self.defect == "probs_output":
            return out, probs
        return out


def _twin(defect: str) -> Callable[[], Built]:
    def build() -> Built:
        x = torch.randn(2, NS, NS * NS)
        outs = ["out", "probs"] if defect == "probs_output" else ["out"]
        return Built(ExplicitTwin(defect), (x,), None, ["x"], outs, None)

    build.__name__ = f"build_twin_{defect}"
    build.__qualname__ = build.__name__
    return build


# --------------------------------------------------------------------------- #
# Classifiers without attention
# --------------------------------------------------------------------------- #
def build_mlp_classifier() -> Built:
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    bd, _ = _dims(seq=False)
    mk = lambda b, s: (torch.randn(b, 20),)  # noqa: E731
    return Built(m, mk(4, 0), ({0: bd},), ["x"], ["logits"], mk)


def build_cnn_classifier() -> Built:
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10),
    )  # fmt: skip
    bd, _ = _dims(seq=False)
    mk = lambda b, s: (torch.randn(b, 3, 16, 16),)  # noqa: E731
    return Built(m, mk(4, 0), ({0: bd},), ["x"], ["logits"], mk)


# --------------------------------------------------------------------------- #
# Hugging Face models (tiny configs, random weights)
# --------------------------------------------------------------------------- #
def _hf_built(model: nn.Module, seq: int = 16) -> Built:
    from rewrite.hf import wrap_hf_model

    hf = wrap_hf_model(model, batch=2, seq=seq)

    def mk(b: int, s: int) -> tuple[torch.Tensor, ...]:
        d = hf.make_inputs(b, s)
        return tuple(d[n] for n in hf.input_names)

    return Built(hf.module, hf.args, hf.dynamic_shapes, list(hf.input_names), list(hf.output_names), mk)


def _bert_config(impl: str, **kw: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, attn_implementation=impl, **kw,
    )  # fmt: skip


def build_hf_bert_eager() -> Built:
    from transformers import BertModel

    return _hf_built(BertModel(_bert_config("eager")))


def build_hf_bert_sdpa() -> Built:
    from transformers import BertModel

    return _hf_built(BertModel(_bert_config("sdpa")))


def build_hf_bert_cls() -> Built:
    from transformers import BertForSequenceClassification

    return _hf_built(BertForSequenceClassification(_bert_config("sdpa", num_labels=3)))


def _gpt2(impl: str) -> Built:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation=impl,
        bos_token_id=1, eos_token_id=2, use_cache=False,
    )  # fmt: skip
    return _hf_built(GPT2Model(cfg))


def build_hf_gpt2_eager() -> Built:
    return _gpt2("eager")


def build_hf_gpt2_sdpa() -> Built:
    return _gpt2("sdpa")


def _llama(impl: str, kv_heads: int = 2) -> Built:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        intermediate_size=128, max_position_embeddings=64, attn_implementation=impl, use_cache=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return _hf_built(LlamaModel(cfg))


def build_hf_llama_eager() -> Built:
    return _llama("eager")


def build_hf_llama_sdpa() -> Built:
    return _llama("sdpa")


def build_hf_mqa_eager() -> Built:
    """Multi-query attention (one KV head, as in Gemma-2B or Falcon): the dynamo exporter writes the K/V head
    transpose as a Reshape, since the moved axis has size 1."""
    return _llama("eager", kv_heads=1)


def build_hf_mqa_sdpa() -> Built:
    return _llama("sdpa", kv_heads=1)


class KVReshapeTwin(nn.Module):
    """Grouped-query attention whose K/V "transpose" (B, S, Hkv, D) -> (B, Hkv, S, D) is a reshape of a size-2
    axis: heads and token positions scrambled, a wrong model that must not be recognized (the true negative of the
    one-KV-head reshape, which is a transpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(E, E), nn.Linear(E, E // 2), nn.Linear(E, E // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = E // H
        q = self.q(x).view(b, s, H, d).transpose(1, 2)
        k = self.k(x).view(b, s, 2, d).reshape(b, 2, s, d).repeat_interleave(2, dim=1)
        v = self.v(x).view(b, s, 2, d).reshape(b, 2, s, d).repeat_interleave(2, dim=1)
        return torch.softmax(q @ k.transpose(-2, -1) * d**-0.5, dim=-1) @ v


def build_twin_kv_reshape() -> Built:
    return Built(KVReshapeTwin(), (torch.randn(B, S, E),), None, ["x"], ["out"], None)


def _vit_config(impl: str, **kw: Any) -> Any:
    from transformers import ViTConfig

    return ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, attn_implementation=impl, **kw,
    )  # fmt: skip


def build_hf_vit_eager() -> Built:
    from transformers import ViTModel

    return _hf_built(ViTModel(_vit_config("eager")))


def build_hf_vit_sdpa() -> Built:
    from transformers import ViTModel

    return _hf_built(ViTModel(_vit_config("sdpa")))


def build_hf_vit_cls() -> Built:
    from transformers import ViTForImageClassification

    return _hf_built(ViTForImageClassification(_vit_config("sdpa", num_labels=5)))


def build_minilm() -> Built:
    from rewrite.hf import load_hf_folder, minilm_path

    hf = load_hf_folder(minilm_path(), batch=2, seq=16)

    def mk(b: int, s: int) -> tuple[torch.Tensor, ...]:
        d = hf.make_inputs(b, s)
        return tuple(d[n] for n in hf.input_names)

    return Built(hf.module, hf.args, hf.dynamic_shapes, list(hf.input_names), list(hf.output_names), mk)


# --------------------------------------------------------------------------- #
# The zoo
# --------------------------------------------------------------------------- #
def _s(n: int, *, scale: float | None = None, causal: bool = False, mask: str = "none",
       heads: int = H, kv_heads: int | None = None, head_dim: int = E // H) -> list[Site]:  # fmt: skip
    return sites(
        n, scale=head_dim**-0.5 if scale is None else scale, causal=causal, mask=mask, heads=heads,
        kv_heads=heads if kv_heads is None else kv_heads, head_dim=head_dim,
    )  # fmt: skip


def _zoo() -> list[ZooModel]:
    hf = frozenset({"hf"})
    z = [
        ZooModel("mha_key_padding", build_mha_key_padding, _s(1, mask="key_padding"),
                 notes="MHA merges key_padding_mask into a bool/float attn_mask -> SDPA"),
        ZooModel("mha_causal_float", build_mha_causal_float, _s(1, causal=True, mask="causal"),
                 notes="need_weights=True: q pre-scaled (mul by 1/sqrt(d)), baddbmm(mask, q, k^T), softmax, bmm"),
        ZooModel("mha_causal_bool", build_mha_causal_bool, _s(1, causal=True, mask="causal")),
        ZooModel("transformer_encoder", build_transformer_encoder, _s(2)),
        ZooModel("sdpa_causal", build_sdpa_causal, _s(1, causal=True, mask="causal")),
        ZooModel("sdpa_additive", build_sdpa_additive, _s(1, mask="additive")),
        ZooModel("sdpa_bool", build_sdpa_bool, _s(1, mask="boolean")),
        ZooModel("sdpa_scale03", build_sdpa_scale03, _s(1, scale=0.3)),
        ZooModel("sdpa_decomposed", build_sdpa_decomposed, _s(1, mask="boolean"),
                 notes="core ATen: softmax(add(view(bmm(view(expand(q*s^.5)), view(expand(kT*s^.5)))), "
                 "where(mask, 0, -inf))) -> where(not(any(not(eq(scores, -inf)))), full_like(p, 0), p) -> "
                 "view(expand) -> bmm -> view"),
        ZooModel("timm_vit_block", build_timm_vit_block, _s(1)),
        # Hugging Face, tiny configs (transformers 5.x builds bool masks with index/and ops under export).
        ZooModel("hf_bert_eager", build_hf_bert_eager, _s(2, mask="key_padding"), tags=hf),
        ZooModel("hf_bert_sdpa", build_hf_bert_sdpa, _s(2, mask="key_padding"), tags=hf),
        ZooModel("hf_bert_cls", build_hf_bert_cls, _s(2, mask="key_padding"), classifier_heads=1,
                 tags=hf | {"classifier"}),
        ZooModel("hf_gpt2_eager", build_hf_gpt2_eager, _s(2, causal=True, mask="causal+padding"), tags=hf),
        ZooModel("hf_gpt2_sdpa", build_hf_gpt2_sdpa, _s(2, causal=True, mask="causal+padding"), tags=hf),
        ZooModel("hf_llama_eager", build_hf_llama_eager,
                 _s(2, causal=True, mask="causal+padding", heads=4, kv_heads=2, head_dim=16), tags=hf),
        ZooModel("hf_llama_sdpa", build_hf_llama_sdpa,
                 _s(2, causal=True, mask="causal+padding", heads=4, kv_heads=2, head_dim=16), tags=hf),
        ZooModel("hf_mqa_eager", build_hf_mqa_eager,
                 _s(2, causal=True, mask="causal+padding", heads=4, kv_heads=1, head_dim=16), tags=hf),
        ZooModel("hf_mqa_sdpa", build_hf_mqa_sdpa,
                 _s(2, causal=True, mask="causal+padding", heads=4, kv_heads=1, head_dim=16), tags=hf),
        ZooModel("hf_vit_eager", build_hf_vit_eager, _s(2), tags=hf),
        ZooModel("hf_vit_sdpa", build_hf_vit_sdpa, _s(2), tags=hf),
        ZooModel("hf_vit_cls", build_hf_vit_cls, _s(2), classifier_heads=1, tags=hf | {"classifier"}),
        ZooModel("mlp_classifier", build_mlp_classifier, [], classifier_heads=1, tags=frozenset({"classifier"})),
        ZooModel("cnn_classifier", build_cnn_classifier, [], classifier_heads=1, tags=frozenset({"classifier"})),
        ZooModel("minilm", build_minilm, _s(6, mask="key_padding", heads=12, head_dim=32),
                 tags=hf | {"slow", "real"}),
        # Negative twins.
        ZooModel("twin_k_permuted", _twin("k_permuted"), [], expected_reason="k_not_transposed",
                 tags=frozenset({"negative"})),
        ZooModel("twin_softmax_axis", _twin("softmax_axis"), [], expected_reason="softmax_axis",
                 tags=frozenset({"negative"})),
        ZooModel("twin_probs_output", _twin("probs_output"), [], expected_reason="probs_escape",
                 tags=frozenset({"negative"})),
        ZooModel("twin_tensor_scale", _twin("tensor_scale"), [], expected_reason="scale_not_scalar",
                 tags=frozenset({"negative"})),
        ZooModel("twin_no_matmul", _twin("no_matmul"), [], expected_reason="no_pv_matmul",
                 tags=frozenset({"negative"})),
        ZooModel("twin_kv_reshape", build_twin_kv_reshape, [], expected_reason="kv_reshape",
                 tags=frozenset({"negative"})),
    ]  # fmt: skip
    for m in z:
        m.unsupported.update(UNSUPPORTED.get(m.name, {}))
        m.static.update(STATIC.get(m.name, {}))
        m.notes = m.notes or NOTES.get(m.name, "")
    return z


#: exporter -> reason, per entry, for exporters observed to fail (filled from probing).
UNSUPPORTED: dict[str, dict[str, str]] = {
    "sdpa_decomposed": {"legacy": "a core-ATen decomposition is a spelling of exported programs; the TorchScript "
                        "exporter traces the module, which is sdpa_bool"},
    "twin_kv_reshape": {"legacy": "the TorchScript exporter writes repeat_interleave as Tile and leaves the reshapes "
                        "without shapes, so the layout can be proven neither way (a known limit: recognized)"},
}
_MHA_TRACE = (
    "TorchScript trace bakes bsz*num_heads of nn.MultiheadAttention's reshapes into constants "
    "(Reshape to {8, 12, 8} fails at batch 3)"
)
#: exporter -> reason, per entry, for exports that only run at the example shapes.
STATIC: dict[str, dict[str, str]] = {
    n: {"legacy": _MHA_TRACE} for n in ("mha_key_padding", "mha_causal_float", "mha_causal_bool", "transformer_encoder")
}
_HF_MASK_FX = "mask = expand(__and__(__and__(new_ones, <causal le / ones>), to(index(attention_mask.bool, [b, kv]))))"
_HF_MASK_ONNX = "Where(And(And(..), GatherND(attention_mask)), 0, -3.4028e38) (dynamo); Where(Expand(And, Where), 0, -inf) (legacy)"
_SDPA_ONNX = "ONNX SDPA: Softmax(Add(MatMul(Mul(q, sqrt(scale)), Mul(k^T, sqrt(scale))), mask)); bool masks add IsNaN/Where after Softmax"
#: Observed spellings of mask/scale around softmax (torch 2.13, transformers 5.24).
NOTES: dict[str, str] = {
    "mha_key_padding": "FX: sdpa(q, k, v, view(masked_fill_(zeros_like(kpm), kpm, -inf))) no scale kwarg. " + _SDPA_ONNX,
    "mha_causal_float": "FX: softmax(baddbmm(unsqueeze(triu(full(-inf),1)), mul(q, 1/sqrt(d)), k^T)) -> bmm; "
    "ONNX legacy: Softmax(Add(Mul(MatMul, 1), Mul(Unsqueeze(Trilu), 1))) (baddbmm alpha/beta)",
    "mha_causal_bool": "FX: sdpa(..., masked_fill_(zeros_like(triu(ones)), triu, -inf)). " + _SDPA_ONNX,
    "transformer_encoder": "FX: sdpa(q, k, v) no mask, no scale kwarg; legacy ONNX scale = Sqrt(Cast(Shape)) at run time",
    "sdpa_causal": "FX: sdpa(q, k, v, None, 0.0, True); ONNX: Where(Equal(Trilu(ones), 0), -inf|-3.4e38, 0) added",
    "sdpa_additive": "FX: sdpa(q, k, v, %mask); ONNX: Add(scores, %mask)",
    "sdpa_bool": "FX: sdpa(q, k, v, %mask bool); ONNX: Add(scores, Where(%mask, 0, -inf|-3.4e38)), Softmax -> IsNaN/Where",
    "sdpa_scale03": "FX: sdpa(..., scale=0.3); ONNX: q and k each Mul by sqrt(0.3)=0.5477",
    "timm_vit_block": "FX: softmax(mul(matmul(q, transpose(k,-2,-1)), 0.3536), -1) -> dropout -> matmul; ONNX Transpose perm=[0,1,3,2]",
    "hf_bert_eager": f"FX: softmax(add(mul(matmul(q,k^T), s), where(expand(mask), zeros(), -3.4e38))); {_HF_MASK_FX}; {_HF_MASK_ONNX}",
    "hf_bert_sdpa": f"FX: sdpa(q,k,v, bool mask, scale=s); {_HF_MASK_FX}; " + _SDPA_ONNX,
    "hf_gpt2_eager": "as hf_bert_eager, plus causal le(kv_idx, q_idx) in the mask; softmax -> to.dtype -> dropout",
    "hf_gpt2_sdpa": "as hf_bert_sdpa, plus causal le(kv_idx, q_idx) in the mask",
    "hf_llama_eager": "softmax(..., -1, torch.float32) (dtype arg); K/V repeat_kv = reshape(expand(unsqueeze(k,2))); scale 0.25",
    "hf_llama_sdpa": "sdpa(q_rope, reshape(expand(unsqueeze(k,2))), reshape(expand(unsqueeze(v,2))), bool mask, scale=0.25) (no enable_gqa)",
    "hf_mqa_eager": "one KV head: FX view(k, (B, S, 1, D)) then transpose(1, 2); dynamo ONNX writes that transpose "
    "as Reshape (B, S, 1, D) -> (B, 1, S, D)",
    "twin_kv_reshape": "K/V (B, S, 2, D) -> (B, 2, S, D) by reshape: refused (a transpose of a size-2 axis is not a reshape)",
    "hf_vit_eager": "mask is all-true: where(expand(ge(arange, 0)), 0, -3.4e38) (FX), constant Expand in dynamo ONNX, "
    "folded away in legacy ONNX",
    "hf_vit_sdpa": "sdpa(q,k,v, expand(ge(arange,0)) all-true bool mask, scale=s); legacy ONNX has no mask at all",
    "twin_probs_output": "ONNX: probs is a graph output (not a node consumer) besides feeding MatMul",
}

ZOO: list[ZooModel] = _zoo()
BY_NAME: dict[str, ZooModel] = {m.name: m for m in ZOO}


def get(name: str) -> ZooModel:
    return BY_NAME[name]


def params(*, exporters: bool = False, names: Sequence[str] | None = None) -> list[Any]:
    """pytest params over the zoo (``slow`` mark on real models).

    With ``exporters``, one ``(name, exporter)`` param per exporter the entry supports.
    """
    import pytest

    out = []
    for m in ZOO:
        if names is not None and m.name not in names:
            continue
        marks = [pytest.mark.slow] if m.slow else []
        if exporters:
            out += [pytest.param(m.name, ex, marks=marks, id=f"{m.name}-{ex}") for ex in m.exporters]
        else:
            out.append(pytest.param(m.name, marks=marks, id=m.name))
    return out


# --------------------------------------------------------------------------- #
# Export helpers (cached on disk)
# --------------------------------------------------------------------------- #
class ExportUnsupported(RuntimeError):
    """The requested exporter is marked unsupported for this zoo entry."""


def cache_dir(root: Path | None = None) -> Path:
    """The per-torch-version cache folder (created, self-ignored by git)."""
    base = Path(os.environ.get("SOFTSWAP_ZOO_CACHE", root or DEFAULT_CACHE))
    d = base / f"torch-{torch.__version__.replace('+', '_')}"
    d.mkdir(parents=True, exist_ok=True)
    ignore = base.parent / ".gitignore" if base == DEFAULT_CACHE else base / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return d


def _check(zm: ZooModel, exporter: str) -> None:
    if exporter in zm.unsupported:
        raise ExportUnsupported(f"{zm.name}: exporter {exporter!r} unsupported: {zm.unsupported[exporter]}")


def export_fx(zm: ZooModel, *, cache: Path | None = None, refresh: bool = False) -> Any:
    """``torch.export`` the entry (with its dynamic shapes), cached as ``.pt2``; loaded via ``load_pt2``."""
    from rewrite.hf import load_pt2

    _check(zm, "fx")
    path = cache_dir(cache) / f"{zm.cache_key()}.pt2"
    if path.exists() and not refresh:
        return load_pt2(path)
    module, args, dyn = zm.build()
    with torch.no_grad():
        ep = torch.export.export(module, args, dynamic_shapes=dyn, strict=False)
        if zm.built().decompose:
            ep = ep.run_decompositions()
    tmp = path.with_suffix(".tmp.pt2")
    torch.export.save(ep, tmp)
    tmp.replace(path)
    log.info("exported %s -> %s", zm.name, path)
    return ep


def _legacy_dynamic_axes(zm: ZooModel) -> dict[str, dict[int, str]] | None:
    b = zm.built()
    if b.dynamic_shapes is None:
        return None
    specs = b.dynamic_shapes.values() if isinstance(b.dynamic_shapes, dict) else b.dynamic_shapes
    axes: dict[str, dict[int, str]] = {}
    for name, spec in zip(b.input_names, specs):
        if spec:
            axes[name] = {i: d.__name__ for i, d in spec.items()}
    return axes


def export_onnx(
    zm: ZooModel,
    exporter: str = "dynamo",
    *,
    cache: Path | None = None,
    refresh: bool = False,
) -> Path:
    """Export the entry to ONNX (cached). ``dynamo``: opset 18 from the ExportedProgram; ``legacy``: TorchScript, opset 17."""
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"unknown ONNX exporter {exporter!r}")
    _check(zm, exporter)
    path = cache_dir(cache) / f"{zm.cache_key()}.{exporter}.onnx"
    if path.exists() and not refresh:
        return path
    b = zm.built()
    tmp = path.with_suffix(".tmp.onnx")
    import warnings

    # No torch.no_grad() for the legacy exporter: under no_grad, eval nn.MultiheadAttention and
    # nn.TransformerEncoderLayer take their fused fast paths (aten::_native_multi_head_attention,
    # aten::_transformer_encoder_layer_fwd), which the TorchScript exporter cannot convert.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            ep = export_fx(zm, cache=cache) if "fx" not in zm.unsupported else None
            target = ep if ep is not None else b.module
            onnx_program = torch.onnx.export(
                target, b.args, dynamo=True, opset_version=18, input_names=b.input_names,
                output_names=b.output_names, dynamic_shapes=None if ep is not None else b.dynamic_shapes,
                external_data=False, verbose=False,
            )  # fmt: skip
            onnx_program.save(str(tmp), external_data=False)
        else:
            torch.onnx.export(
                b.module, b.args, str(tmp), dynamo=False, opset_version=17, input_names=b.input_names,
                output_names=b.output_names, dynamic_axes=_legacy_dynamic_axes(zm),
            )  # fmt: skip
    tmp.replace(path)
    log.info("exported %s (%s) -> %s", zm.name, exporter, path)
    return path


def ort_run(path: Path, args: Sequence[Any], names: Sequence[str] | None = None) -> list[Any]:
    """Run an ONNX file in onnxruntime (CPU, 2 threads).

    Tensor ``args`` are fed by ``names`` when given (inputs an exporter dropped are skipped),
    else positionally.
    """
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    wanted = [i.name for i in sess.get_inputs()]
    if names is not None and set(wanted) <= set(names):
        pairs = [(n, t) for n, t in zip(names, tensors) if n in wanted]
    else:
        pairs = list(zip(wanted, tensors))
    feed = {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in pairs}
    return sess.run(None, feed)
