"""Optional MetaSchedule tuning of the matmul tasks, with an on-disk database reused across runs.

``tune(mod, target, work_dir, trials)`` legalizes and fuses the Relax module, tunes the ``matmul`` tasks with
MetaSchedule (random cost model: no xgboost needed) and records in ``work_dir/softswap-tuning.json`` which module
(structural hash) was tuned with how many trials; a later call for the same module with no more trials reuses the
database without tuning again. The CPU pipeline then applies the database before its default rules
(``cpu_pipeline(..., tuning_dir=...)``). Tuning costs minutes (spec/lowering.md §1.7): it is for deployment builds,
not tests.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from .errors import CompileError

log = logging.getLogger(__name__)

MARKER = "softswap-tuning.json"


def default_tuning_dir() -> str:
    """``$SOFTSWAP_TUNING_DIR`` or ``~/.cache/softswap/tuning``."""
    return os.environ.get("SOFTSWAP_TUNING_DIR", str(Path.home() / ".cache" / "softswap" / "tuning"))


def tuning_target(target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with ``num-cores`` (MetaSchedule needs it on CPU targets; idempotent)."""
    config = {k: v for k, v in target.export().items() if k in ("kind", "mcpu", "mattr", "keys")}
    config["num-cores"] = max(1, int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))
    return tvm.target.Target(config)


def tune(mod: tvm.IRModule, target: tvm.target.Target, work_dir: str | os.PathLike, trials: int) -> dict[str, Any]:
    """Tune ``mod``'s matmul tasks for ``target`` into ``work_dir`` (reused when already tuned); returns a summary."""
    from tvm.s_tir import meta_schedule as ms

    if str(target.kind.name) != "llvm":
        raise CompileError("tuning is implemented for CPU targets only", culprit=str(target))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tgt = tuning_target(target)
    with tgt:
        fused = relax.get_pipeline("zero")(mod)
    from tvm_ffi import structural_hash
    key = f"{structural_hash(fused)}:{tgt}"
    marker = work / MARKER
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if done.get(key, 0) >= trials:
        log.info("tuning database %s already holds %d trials for this module: reused", work, done[key])
        return {"work_dir": str(work), "trials": done[key], "reused": True, "seconds": 0.0}
    start = time.perf_counter()
    try:
        ms.relax_integration.tune_relax(
            fused, {}, tgt, str(work), max_trials_global=trials, max_trials_per_task=trials, op_names=["matmul"],
            num_trials_per_iter=min(16, trials), cost_model="random",
            runner=ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=1,
                                                                                    min_repeat_ms=0)))
    except Exception as exc:  # noqa: BLE001 - MetaSchedule errors are wrapped with the database named
        raise CompileError(f"MetaSchedule tuning failed: {type(exc).__name__}: {str(exc)[:300]}",
                           culprit=str(work)) from exc
    seconds = time.perf_counter() - start
    done[key] = trials
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(done, indent=1))
    os.replace(tmp, marker)
    log.info("tuned %d trials in %.1fs into %s", trials, seconds, work)
    return {"work_dir": str(work), "trials": trials, "reused": False, "seconds": round(seconds, 1)}
