"""Artefacts: export, metadata, reload in a fresh process, typed errors, atomic output."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from targets import Runner, compile_model
from targets.errors import CompileError, InputError, LoweringLoadError, TargetError

from tgt_models import ms_attention_model, ort_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    proto = ms_attention_model()
    path = d / "attn.so"
    meta = compile_model(proto, "host", path)
    return proto, path, meta


def _feeds():
    rng = np.random.default_rng(3)
    m = np.ones((2, 16), np.int32)
    m[:, -2:] = 0
    return {"x": rng.standard_normal((2, 16, 32)).astype(np.float32), "mask": m}


def test_metadata_sidecar(artefact):
    _, path, meta = artefact
    assert path.exists()
    side = json.loads((path.parent / (path.name + ".json")).read_text())
    assert side["inputs"] == [{"name": "x", "shape": [2, 16, 32], "dtype": "float32"},
                              {"name": "mask", "shape": [2, 16], "dtype": "int32"}]
    assert [o["name"] for o in side["outputs"]] == ["y"]
    assert side["target"] == meta["target"] and "llvm" in side["target"]
    # the features the code needs, as LLVM names them, and this host has every one of them
    from targets.cpu import host_features
    assert {"sse2", "avx"} <= set(side["requires"]["cpu_features"]) <= host_features()


def test_runner_matches_ort(artefact):
    proto, path, _ = artefact
    out = Runner(path).run(_feeds())
    np.testing.assert_allclose(out["y"], ort_run(proto, _feeds())[0], atol=1e-4)


def test_reload_in_fresh_process(artefact, tmp_path):
    proto, path, _ = artefact
    feeds = _feeds()
    np.savez(tmp_path / "in.npz", **feeds)
    code = (f"import sys, numpy as np; sys.path.insert(0, {ROOT!r}); from targets import Runner; "
            f"d = dict(np.load({str(tmp_path / 'in.npz')!r})); out = Runner({str(path)!r}).run(d); "
            f"np.save({str(tmp_path / 'out.npy')!r}, out['y'])")
    env = dict(os.environ, TVM_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), Runner(path).run(feeds)["y"], rtol=0, atol=0)


def test_runner_input_errors(artefact):
    _, path, _ = artefact
    r = Runner(path)
    feeds = _feeds()
    with pytest.raises(InputError) as ei:
        r.run({"x": feeds["x"]})
    assert ei.value.culprit == "mask"
    with pytest.raises(InputError) as ei:
        r.run({"x": feeds["x"][:1], "mask": feeds["mask"]})
    assert ei.value.culprit == "x"
    with pytest.raises(InputError):
        r.run({"x": feeds["x"].astype(np.float64), "mask": feeds["mask"]})


def test_bad_model_leaves_nothing(tmp_path):
    out = tmp_path / "bad.so"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(LoweringLoadError) as ei:
        compile_model(bad, "avx2", out)
    assert ei.value.culprit == str(bad)
    with pytest.raises(TargetError):
        compile_model(tmp_path / "missing.onnx", "avx2", out)
    with pytest.raises(TargetError):
        compile_model(ms_attention_model(), "no-such-target", out)
    assert os.listdir(tmp_path) == ["bad.onnx"]


def test_export_failure_is_atomic(tmp_path):
    with pytest.raises(CompileError):
        compile_model(ms_attention_model(), "avx2", tmp_path / "no_dir" / "m.so")
    assert not (tmp_path / "no_dir").exists()


def _dynamic_model():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(5).standard_normal((16, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shapes", [None, {"x": [3, 5, 16]}], ids=["symbolic", "user_shapes"])
def test_dynamic_dims(tmp_path, shapes):
    proto = _dynamic_model()
    meta = compile_model(proto, "avx2", tmp_path / "dyn.so", shapes=shapes)
    assert meta["inputs"][0]["shape"] == (["batch", "seq", 16] if shapes is None else [3, 5, 16])
    x = np.random.default_rng(6).standard_normal((3, 5, 16)).astype(np.float32)
    out = Runner(tmp_path / "dyn.so").run({"x": x})["y"]
    np.testing.assert_allclose(out, ort_run(proto, {"x": x})[0], atol=1e-5)
    if shapes:
        with pytest.raises(InputError):
            Runner(tmp_path / "dyn.so").run({"x": x[:2]})


#: What an AMD Zen 3 (AVX2, no AVX-512) offers, in LLVM's names.
ZEN3 = frozenset({"sse", "sse2", "sse3", "ssse3", "sse4.1", "sse4.2", "sse4a", "avx", "avx2", "fma", "f16c", "bmi",
                  "bmi2", "lzcnt", "popcnt", "movbe", "cmov", "cx8", "cx16"})


@pytest.fixture(scope="module")
def avx512_artefact(tmp_path_factory):
    """An artefact cross-compiled for avx512-amd (znver4): builds on any host."""
    d = tmp_path_factory.mktemp("art512")
    path = d / "attn512.so"
    meta = compile_model(ms_attention_model(), "avx512-amd", path)
    return path, meta


def test_avx512_artefact_records_its_features(avx512_artefact):
    _, meta = avx512_artefact
    req = meta["requires"]
    assert req["cpu"] == "znver4" and req["gpu_arch"] is None
    assert {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"} <= set(req["cpu_features"])
    # tuning flags and system instructions of the model are not requirements (KVM guests hide them)
    assert not {"mwaitx", "rdpru", "pku", "wbnoinvd"} & set(req["cpu_features"])


def test_runner_refuses_avx512_artefact_on_avx2_host(avx512_artefact, monkeypatch):
    """Host flags injected: a Zen 3.  The Runner refuses before loading the library, naming what is missing and the
    target to use; nothing is executed (a SIGILL would kill this test process)."""
    import targets.cpu
    from targets.errors import UnsupportedHostError

    path, _ = avx512_artefact
    monkeypatch.setattr(targets.cpu, "host_features", lambda: ZEN3)
    with pytest.raises(UnsupportedHostError) as ei:
        Runner(path)
    msg = str(ei.value)
    assert ei.value.culprit == str(path) and "\n" not in msg
    assert "avx512f" in msg.split("lacks:")[1].split(",")[0] and "--target host" in msg


def test_cli_run_refuses_with_exit_2(avx512_artefact, monkeypatch, tmp_path, capsys):
    import targets.cpu
    from rewrite.cli import main

    path, _ = avx512_artefact
    np.savez(tmp_path / "in.npz", **_feeds())
    monkeypatch.setattr(targets.cpu, "host_features", lambda: ZEN3)
    out = tmp_path / "out.npz"
    assert main(["run", str(path), "--inputs", str(tmp_path / "in.npz"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "avx512f" in err[0] and str(path) in err[0]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["in.npz"]


def test_bench_refuses_a_target_the_host_cannot_run(monkeypatch):
    import targets.cpu
    from targets.bench import benchmark
    from targets.errors import UnsupportedHostError

    monkeypatch.setattr(targets.cpu, "host_features", lambda: ZEN3)
    with pytest.raises(UnsupportedHostError) as ei:
        benchmark(ms_attention_model(), "avx512", _feeds(), runs=1)
    assert "avx512f" in str(ei.value) and ei.value.culprit == "avx512"


def test_host_target_switches_off_what_the_host_lacks(monkeypatch):
    """``host`` is LLVM's host CPU name with every ISA feature of that model the host lacks switched off, so its code
    runs here whatever the model name promises (a VM hiding AVX-512 behind a Zen 4 name)."""
    import targets.cpu as cpu
    from targets.softmax_kernels import vector_bits_of
    from targets.table import get_target, missing_on_host

    monkeypatch.setattr(cpu, "host_features", lambda: ZEN3)
    cpu.host_target_dict.cache_clear()
    try:
        d = cpu.host_target_dict()
        assert d["mcpu"] == cpu.host_cpu_name()
        assert not set(cpu.required_features(d)) - ZEN3
        assert missing_on_host("host") == [] and missing_on_host("avx2") == []
        assert "avx512f" in missing_on_host("avx512")
        assert vector_bits_of(get_target(d)) == 256
    finally:
        cpu.host_target_dict.cache_clear()


@pytest.mark.avx512
def test_avx512_artefact_runs_where_supported(tmp_path):
    # ``avx512`` resolves to this host's vendor flavour (znver4 code needs AMD's sse4a: an Intel AVX-512 host
    # rightly refuses the avx512-amd fixture, see the next test)
    path = tmp_path / "attn512_host_vendor.so"
    compile_model(ms_attention_model(), "avx512", path)
    from tgt_models import ort_run as ref
    out = Runner(path).run(_feeds())
    np.testing.assert_allclose(out["y"], ref(ms_attention_model(), _feeds())[0], atol=1e-4)


def test_znver4_artefact_runs_or_is_refused_by_this_hosts_features(avx512_artefact):
    """On the real host (no injected flags): the avx512-amd (znver4) artefact runs and matches onnxruntime when the
    host has every feature it records, else the Runner refuses before loading, naming the first missing ones (an
    Intel AVX-512 host lacks AMD's sse4a; an AVX2 host avx512f)."""
    from targets.cpu import missing_features
    from targets.errors import UnsupportedHostError

    path, meta = avx512_artefact
    lacking = missing_features(meta["requires"]["cpu_features"])
    if lacking:
        with pytest.raises(UnsupportedHostError) as ei:
            Runner(path)
        assert lacking[0] in str(ei.value).split("lacks:")[1] and ei.value.culprit == str(path)
    else:
        out = Runner(path).run(_feeds())
        np.testing.assert_allclose(out["y"], ort_run(ms_attention_model(), _feeds())[0], atol=1e-4)


def test_frontend_failure_is_one_line_with_the_symbolic_dims_named(monkeypatch, capfd):
    """What TVM's ONNX frontend prints while failing (its operator dump on stdout, C++ warnings on stderr) stays out
    of the user's terminal; the error keeps the dependency's first line and names the symbolic inputs to fix."""
    import tvm.relax.frontend.onnx as frontend

    from targets.errors import ImportFailedError
    from targets.importer import import_onnx

    def failing(*_a, **_k):
        print("Error converting operator Reshape, with inputs: [...]")
        os.write(2, b"[native] Warning: BlockBuilder destroyed with remaining blocks!\n")
        raise ValueError("Reshape expects the input tensor to have known shape\n  long dependency context")

    monkeypatch.setattr(frontend, "from_onnx", failing)
    with pytest.raises(ImportFailedError) as ei:
        import_onnx(_dynamic_model())
    msg = str(ei.value)
    assert "\n" not in msg and "Reshape expects" in msg and "long dependency context" not in msg
    assert "x ['batch', 'seq', 16]" in msg and "--shape x=" in msg
    out, err = capfd.readouterr()
    assert "Error converting" not in out and "BlockBuilder" not in err
