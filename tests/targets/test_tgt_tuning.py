"""MetaSchedule tuning (slow): a tuned build matches onnxruntime, tuned records are applied only where they beat the
hand rules, and the on-disk database is reused."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tgt_models import ort_run

pytestmark = pytest.mark.slow


def test_tuned_build_matches_and_database_is_reused(tmp_path, rng, monkeypatch):
    import targets.tuning as tuning
    from targets import Runner, compile_model
    from targets.table import get_target

    n = 128
    w = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "mm.onnx"
    onnx.save(model, path)
    db = tmp_path / "db"
    meta = compile_model(str(path), "avx2", tmp_path / "a.so", tune_trials=4, tuning_dir=db)
    assert meta["tuning"]["reused"] is False and (db / "database_tuning_record.json").exists()
    # every tuned task was timed against the hand rule; only winners went to the applied database
    tasks = meta["tuning"]["tasks"]
    assert tasks and all(t["tuned_ms"] > 0 and t["rule_ms"] > 0 for t in tasks)
    assert all(t["applied"] == (t["tuned_ms"] < t["rule_ms"]) for t in tasks)
    applied = (db / "selected" / "database_tuning_record.json")
    n_applied = len(applied.read_text().splitlines()) if applied.exists() else 0
    assert n_applied == sum(t["applied"] for t in tasks)
    x = rng.standard_normal((n, n)).astype(np.float32)
    got = Runner(tmp_path / "a.so").run({"x": x})["y"]
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    again = compile_model(str(path), "avx2", tmp_path / "b.so", tune_trials=4, tuning_dir=db)
    assert again["tuning"]["reused"] is True
    # force the tuned records to win (the timer reports the tuned schedule faster): the selected database then
    # holds them, and a build applying it loads and still matches
    calls = iter([1e-3, 2e-3] * 8)
    monkeypatch.setattr(tuning, "time_primfunc", lambda *a, **k: next(calls))
    forced = tuning.select_records(db, tuning.tuning_target(get_target("avx2")))
    assert forced and all(t["applied"] for t in forced)
    assert len((db / "selected" / "database_tuning_record.json").read_text().splitlines()) == len(forced)
    compile_model(str(path), "avx2", tmp_path / "c.so", tune_trials=4, tuning_dir=db)
    got = Runner(tmp_path / "c.so").run({"x": x})["y"]
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_tuning_that_measured_nothing_says_why(tmp_path):
    """A run whose every candidate failed is a CompileError naming the first failure, not an empty database."""
    from types import SimpleNamespace

    import targets.tuning as tuning
    from targets.errors import CompileError

    (tmp_path / "database_tuning_record.json").write_text('[0, [[], [10000000000.0], null, null]]\n')
    failed_builds = SimpleNamespace(errors=["TVMError: LLVM ERROR: cannot select"] * 4, built=0)
    with pytest.raises(CompileError) as ei:
        tuning._raise_if_nothing_measured(tmp_path, failed_builds)
    assert "all 4 candidate build(s) failed" in str(ei.value) and "cannot select" in str(ei.value)
    assert ei.value.culprit == str(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "task_0.log").write_text("Trial #0: Error in running: RuntimeError: timeout\n")
    with pytest.raises(CompileError) as ei:
        tuning._raise_if_nothing_measured(tmp_path, SimpleNamespace(errors=[], built=4))
    assert "measured no candidate (4 built" in str(ei.value) and "timeout" in str(ei.value)
    (tmp_path / "database_tuning_record.json").write_text('[0, [[], [0.001], null, null]]\n')
    tuning._raise_if_nothing_measured(tmp_path, SimpleNamespace(errors=[], built=4))  # one measured: no error
