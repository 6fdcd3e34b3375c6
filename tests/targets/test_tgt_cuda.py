"""CUDA builds for sm_80 / sm_90 without a GPU; device source compiles with nvcc."""

import re
import shutil

import pytest
import tvm

from targets.artifact import build, compile_model
from targets.importer import import_onnx
from targets.table import get_target

from tgt_models import ms_attention_model

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
