"""CUDA builds for sm_80 / sm_90 without a GPU; device source compiles with nvcc.  Static builds, and symbolic
builds (no ``--shape``: batch and length left symbolic; ``--shape`` ranges recorded in the metadata) of the zoo's
attention models, their linear-attention rewrites (the causal ones scan with a cumsum over the run-time length) and
a linear-attention block."""

import re
import shutil

import pytest
import tvm

from targets.artifact import build, compile_model
from targets.importer import import_onnx
from targets.table import get_target

from tgt_models import LinearAttention, ms_attention_model, zoo_variant_onnx

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


@pytest.mark.parametrize("name,arch", [("cuda-sm80", "sm_80"), ("cuda-sm90", "sm_90")])
def test_cuda_build_and_nvcc(name, arch):
    from tvm.support import nvcc

    tgt = get_target(name)
    ex = build(import_onnx(ms_attention_model()), tgt)
    src = ex.mod.imports[0].imports[0].inspect_source("")
    assert "__global__" in src
    kernels = re.findall(r"__global__ void[^(]*\((.*?)\)\s*{", src, flags=re.S)
    assert kernels
    assert "threadIdx" in src and "blockIdx" in src
    with tgt:
        cubin = nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc")
    assert isinstance(cubin, (bytes, bytearray)) and len(cubin) > 1000


def test_cuda_artefact_written(tmp_path):
    meta = compile_model(ms_attention_model(), "cuda-sm90", tmp_path / "attn_cuda.so")
    assert meta["device"] == "cuda"
    assert (tmp_path / "attn_cuda.so").stat().st_size > 10000


def _cuda_sources(ex) -> str:
    """The CUDA C source of every device module imported by a built executable."""
    found, stack = [], [ex.mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            found.append(m.inspect_source(""))
        stack.extend(m.imports)
    return "\n".join(found)


def _nvcc(src: str, tgt, arch: str) -> None:
    """Compile CUDA C ``src`` to a cubin for ``arch`` with nvcc (raises on a compile error)."""
    from tvm.support import nvcc

    assert "__global__" in src and "blockIdx" in src
    with tgt:
        cubin = nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc")
    assert isinstance(cubin, (bytes, bytearray)) and len(cubin) > 1000


def _linear_block_onnx(path):
    """tgt_models.LinearAttention exported with batch and length symbolic (dynamo exporter)."""
    import torch
    from torch.export import Dim

    torch.manual_seed(0)
    batch, length = Dim("batch", min=1, max=32), Dim("length", min=2, max=4096)
    prog = torch.onnx.export(LinearAttention().eval(), (torch.randn(2, 16, 32),), dynamo=True, input_names=["x"],
                             dynamic_shapes=({0: batch, 1: length},), verbose=False)
    prog.save(str(path))
    return path


#: (zoo family, attention variant) built without ``--shape``: softmax attention of BERT / Llama / a ViT block, and
#: causal linear rewrites (the chunked form by default since session 8: a cumsum over the run-time chunk count).
SYMBOLIC_ZOO = [("hf_bert_sdpa", None), ("hf_llama_sdpa", None), ("timm_vit_block", None),
                ("sdpa_causal", "linear"), ("hf_gpt2_sdpa", "linear")]


@pytest.mark.parametrize("name,variant", SYMBOLIC_ZOO, ids=[f"{n}-{v or 'original'}" for n, v in SYMBOLIC_ZOO])
def test_cuda_symbolic_zoo_build_and_nvcc(name, variant, zoo_onnx, tmp_path):
    """Every input dim symbolic: the CUDA build keeps them symbolic (the imported signature has no fixed batch or
    length) and its device source compiles for sm_80."""
    import zoo

    from rewrite.io import load_onnx
    from targets.importer import import_model

    src_onnx = zoo_onnx(name, "dynamo")
    loaded = load_onnx(src_onnx)
    feeds = {n: a.numpy() for n, a in zip(loaded.input_names, zoo.get(name).build()[1])}
    path = zoo_variant_onnx(src_onnx, feeds, variant, tmp_path / "model.onnx")
    imported = import_model(str(path), shapes=None)
    assert all(isinstance(d, str) for i in imported.inputs for d in i["shape"][:1])  # batch stays symbolic
    tgt = get_target("cuda-sm80")
    _nvcc(_cuda_sources(build(imported, tgt)), tgt, "sm_80")


def test_cuda_linear_block_symbolic_build_and_nvcc(tmp_path):
    """The linear-attention block with batch and length symbolic, no ``--shape``, for sm_90."""
    from targets.importer import import_model

    imported = import_model(str(_linear_block_onnx(tmp_path / "lin.onnx")), shapes=None)
    assert [d for d in imported.inputs[0]["shape"] if isinstance(d, str)] and imported.inputs[0]["shape"][2] == 32
    tgt = get_target("cuda-sm90")
    _nvcc(_cuda_sources(build(imported, tgt)), tgt, "sm_90")


def test_cuda_artefact_with_shape_ranges(tmp_path):
    """``--shape x=1..32,1..4096,32`` for cuda-sm80: one artefact, the ranges in its metadata, the dims symbolic."""
    from targets.artifact import load_metadata

    meta = compile_model(str(_linear_block_onnx(tmp_path / "lin.onnx")), "cuda-sm80", tmp_path / "lin.so",
                         shapes={"x": [(1, 32), (1, 4096), 32]})
    assert meta["device"] == "cuda"
    assert meta["ranges"] == {"x": [[1, 32], [1, 4096], None]}
    assert load_metadata(str(tmp_path / "lin.so"))["ranges"] == meta["ranges"]
    assert [isinstance(d, str) for d in meta["inputs"][0]["shape"]] == [True, True, False]
