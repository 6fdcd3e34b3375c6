"""Named targets, register use in generated code, thread pool size."""

import re
import subprocess
import sys

import pytest

import targets
from targets.errors import TargetError, UnknownTargetError
from targets.table import TARGETS, get_target, target_dict, target_names

from tgt_models import softmax_matmul_model


def test_targets_are_data():
    for name in ("avx2", "avx512", "cuda-sm80", "cuda-sm90", "host"):
        assert name in target_names()
        d = target_dict(name)
        assert isinstance(d, dict) and d["kind"] in ("llvm", "cuda")
        assert str(get_target(name).kind.name) == d["kind"]
    assert TARGETS["avx2"] == {"kind": "llvm", "mcpu": "haswell"}
    assert target_dict("cuda-sm90")["arch"] == "sm_90"


def test_unknown_target_is_typed():
    with pytest.raises(UnknownTargetError) as ei:
        get_target("avx1024")
    assert isinstance(ei.value, TargetError) and ei.value.culprit == "avx1024"


def _asm(target_name):
    from targets.importer import import_onnx
    from targets.artifact import build

    ex = build(import_onnx(softmax_matmul_model()), target_name)
    return ex.mod.imports[0].inspect_source("asm")


def _host_has_avx512():
    from targets.cpu import has_avx512
    return has_avx512()


@pytest.mark.parametrize("name,zmm", [("avx2", False), ("avx512", True), ("avx512-amd", True),
                                      ("avx512-intel", True), ("host", _host_has_avx512())])
def test_register_width(name, zmm):
    asm = _asm(name)
    n_zmm = len(re.findall(r"%zmm\d+", asm))
    n_ymm = len(re.findall(r"%ymm\d+", asm))
    assert n_ymm > 0 or n_zmm > 0
    if zmm:
        assert n_zmm > 0
    else:
        assert n_zmm == 0 and n_ymm > 0
    assert "expf@PLT" not in asm  # softmax routed to the hand kernel, no libm exp


def test_thread_pool_size_in_subprocess():
    code = "import targets.table, tvm; print(tvm.get_global_func('runtime.NumThreads')())"
    env = {"TVM_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(__import__("pathlib").Path(targets.__file__).parents[1]), timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "2", out.stderr[-2000:]
