"""Optional MetaSchedule tuning of the matmul tasks, with an on-disk database reused across runs.

``tune(mod, target, work_dir, trials)`` legalizes and fuses the Relax module, tunes the ``matmul`` tasks with
MetaSchedule (random cost model: no xgboost needed) and records in ``work_dir/softswap-tuning.json`` which module
(structural hash) was tuned with how many trials; a later call for the same module with no more trials reuses the
database without tuning again.

A short random search can lose to the hand-written matmul rule (``targets.cpu_rules``), so after tuning every task's
best record is timed against the rule's schedule of the same PrimFunc, on the same random inputs, and only the
records that win are copied to ``work_dir/selected`` — the database the CPU pipeline applies before its default
rules (``cpu_pipeline(..., tuning_dir=selected_dir(work_dir))``). A tuned build is therefore never slower per task
than the untuned one. Tuning costs minutes: it is for deployment builds, not tests.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import tvm
from tvm import relax

from .errors import CompileError, RemoteTuningError
from .rpc_tuning import RemoteDevice, check_tracker, describe, make_runner, remote_timer

log = logging.getLogger(__name__)

MARKER = "softswap-tuning.json"
SELECTED = "selected"


def selected_dir(work_dir: str | os.PathLike) -> str:
    """The database of records that beat the hand rules (what the pipeline applies)."""
    return os.path.join(os.fspath(work_dir), SELECTED)


def default_tuning_dir() -> str:
    """``$SOFTSWAP_TUNING_DIR`` or ``~/.cache/softswap/tuning``."""
    return os.environ.get("SOFTSWAP_TUNING_DIR", str(Path.home() / ".cache" / "softswap" / "tuning"))


def tuning_target(target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with ``num-cores`` (MetaSchedule needs it on CPU targets; idempotent)."""
    config = {k: v for k, v in target.export().items() if k in ("kind", "mcpu", "mattr", "keys")}
    config["num-cores"] = max(1, int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)))
    return tvm.target.Target(config)


def tune(mod: tvm.IRModule, target: tvm.target.Target, work_dir: str | os.PathLike, trials: int,
         remote: RemoteDevice | None = None) -> dict[str, Any]:
    """Tune ``mod``'s matmul tasks for ``target`` into ``work_dir`` (reused when already tuned); returns a summary.

    ``remote``: measure the candidates (and time tuned records against the hand rules) on the RPC servers of a TVM
    tracker instead of this machine (:mod:`targets.rpc_tuning`); builds stay in this process.  The tracker is
    checked before any work (:class:`~targets.errors.RemoteTuningError` when unreachable or without a server)."""
    from tvm.s_tir import meta_schedule as ms

    if str(target.kind.name) != "llvm":
        raise CompileError("tuning is implemented for CPU targets only", culprit=str(target))
    n_workers = check_tracker(remote) if remote is not None else 0
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tgt = tuning_target(target)
    with tgt:
        fused = relax.get_pipeline("zero")(mod)
    from tvm_ffi import structural_hash
    # records measured on a remote device are not this machine's: the marker keeps them apart
    key = f"{structural_hash(fused)}:{tgt}" + (f"@rpc:{remote.key}" if remote is not None else "")
    marker = work / MARKER
    done = json.loads(marker.read_text()) if marker.exists() else {}
    if done.get(key, 0) >= trials and os.path.isdir(selected_dir(work)):
        log.info("tuning database %s already holds %d trials for this module: reused", work, done[key])
        return {"work_dir": str(work), "apply_dir": selected_dir(work), "trials": done[key], "reused": True,
                "seconds": 0.0}
    start = time.perf_counter()
    _import_tensor_intrinsics()
    builder = InProcessBuilder()
    try:
        with _Progress(work / "database_tuning_record.json", trials), _unnamed_handlers_detached():
            ms.relax_integration.tune_relax(
                fused, {}, tgt, str(work), max_trials_global=trials, max_trials_per_task=trials, op_names=["matmul"],
                num_trials_per_iter=min(16, trials), cost_model="random",
                # MetaSchedule's default population (512 candidates bred over 4 genetic rounds per iteration) costs
                # minutes of CPU before the first measurement; a population scaled to the trial budget keeps a
                # short tuning run short (a few trials are a smoke test, not a search)
                strategy=ms.search_strategy.EvolutionarySearch(population_size=_population(trials),
                                                               init_min_unmeasured=min(50, _population(trials))),
                # candidates are built in this process: MetaSchedule's LocalBuilder starts worker processes that each
                # import TVM, and on a loaded 2-core machine every build of a batch timed out ("Build errors: 4
                # sample(s)" after 11 minutes on an AVX2 host); an in-process build of a matmul takes well under 1 s
                builder=builder,
                # the runner's worker imports TVM once for the whole tuning run: a generous timeout covers that
                runner=_runner(remote, n_workers))
    except RemoteTuningError:
        raise
    except Exception as exc:  # noqa: BLE001 - MetaSchedule errors are wrapped with the database named
        raise CompileError(f"MetaSchedule tuning failed: {type(exc).__name__}: {str(exc)[:300]}",
                           culprit=str(work)) from exc
    _raise_if_nothing_measured(work, builder)
    try:
        tasks = select_records(work, tgt, timer=remote_timer(remote) if remote is not None else None)
    except RemoteTuningError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CompileError(f"comparing tuned schedules with the default rules failed: {type(exc).__name__}: "
                           f"{str(exc)[:300]}", culprit=str(work)) from exc
    seconds = time.perf_counter() - start
    done[key] = trials
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(done, indent=1))
    os.replace(tmp, marker)
    log.info("tuned %d trials in %.1fs into %s", trials, seconds, work)
    return {"work_dir": str(work), "apply_dir": selected_dir(work), "trials": trials, "reused": False,
            "seconds": round(seconds, 1), "tasks": tasks, "remote": describe(remote)}


@contextlib.contextmanager
def _unnamed_handlers_detached() -> Iterator[None]:
    """Detach, for the tuning run, the handlers without a name of MetaSchedule's logger.

    ``tune_relax`` rebuilds its logging with ``logging.config.dictConfig`` listing that logger's current handlers
    by name, and fails (``'NoneType' object has no attribute 'format'``) on a handler without one, which a second
    tuning run in one process met (one handler left unnamed by an earlier run's configuration)."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for handler in unnamed:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in unnamed:
            if handler not in logger.handlers:
                logger.addHandler(handler)


def _runner(remote: RemoteDevice | None, n_workers: int):
    """The measuring side: a LocalRunner, or an RPCRunner over the tracker's ``n_workers`` servers."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0)
    if remote is not None:
        return make_runner(remote, n_workers, evaluator)
    # the runner's worker imports TVM once for the whole tuning run: a generous timeout covers that
    return ms.runner.LocalRunner(timeout_sec=120, evaluator_config=evaluator)


def _fast_stack(context: int = 1) -> list:
    """``inspect.stack()`` without ``inspect.getmodule``: the frames, with the source line of each from linecache."""
    import inspect
    import linecache
    import sys

    frames, frame = [], sys._getframe(1)
    while frame is not None:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        line = linecache.getline(filename, lineno) if context else ""
        frames.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name, [line] if line else None,
                                        0 if line else None))
        frame = frame.f_back
    return frames


def _import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule's tuning contexts need it) in seconds, not minutes.

    That module defines ~500 TVMScript functions at import time, and each ``@T.prim_func`` calls ``inspect.stack()``;
    for the importer's ``<frozen importlib>`` frames ``inspect`` scans the whole of ``sys.modules`` per frame, so in a
    process that has torch and transformers loaded the import took 183 s of a 190 s four-trial tuning run.  The
    frames TVMScript reads (locals, and the line of the decorator) are the same from :func:`_fast_stack`."""
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _fast_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


def _population(trials: int) -> int:
    """Evolutionary-search population for a budget of ``trials`` measured candidates: 8 per trial, 32 to 512."""
    return max(32, min(512, 8 * trials))


def _make_in_process_builder():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class _InProcessBuilder(PyBuilder):
        """MetaSchedule builder compiling candidates in this process, one after the other; keeps the build errors
        (``errors``: one line each) so a tuning run whose every candidate failed can say why."""

        def __init__(self):
            super().__init__()
            self.errors: list[str] = []
            self.built = 0

        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    path = default_export(default_build(item.mod, item.target, None))
                    self.built += 1
                    results.append(BuilderResult(path, None))
                except Exception as exc:  # noqa: BLE001 - a failed candidate is a result, not a crash
                    line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                    self.errors.append(line)
                    results.append(BuilderResult(None, line))
            return results

    return _InProcessBuilder


def InProcessBuilder():  # noqa: N802 - a class made on first use (TVM is imported lazily)
    """A MetaSchedule builder that compiles candidates in this process (see :func:`tune`)."""
    global _IN_PROCESS_BUILDER
    if _IN_PROCESS_BUILDER is None:
        _IN_PROCESS_BUILDER = _make_in_process_builder()
    return _IN_PROCESS_BUILDER()


_IN_PROCESS_BUILDER = None


def _raise_if_nothing_measured(work: Path, builder) -> None:
    """A tuning run in which no candidate was built and measured is an error, not an empty database: raise a
    CompileError saying whether the builds or the measurements failed, with the first error."""
    ok = 0
    try:
        with open(work / "database_tuning_record.json", encoding="utf-8") as fh:
            for line in fh:
                if line.strip() and _mean_secs(json.loads(line)[1][1]) < 1e9:  # 1e10 marks failed candidates
                    ok += 1
    except OSError:
        pass
    if ok:
        return
    if builder.errors and not builder.built:
        raise CompileError(f"MetaSchedule tuning: all {len(builder.errors)} candidate build(s) failed; first: "
                           f"{builder.errors[0][:300]}", culprit=str(work))
    logs = sorted((work / "logs").glob("*.log")) if (work / "logs").is_dir() else []
    first = next((ln.strip() for p in logs for ln in p.read_text(errors="replace").splitlines()
                  if "error" in ln.lower()), "no error text in MetaSchedule's logs")
    raise CompileError(f"MetaSchedule tuning measured no candidate ({builder.built} built, {len(builder.errors)} "
                       f"build errors); first error: {first[:300]}", culprit=str(work))


class _Progress:
    """A rich progress bar on stderr counting the measured candidates (lines of the tuning-record file) while
    MetaSchedule runs in this thread; off when ``SOFTSWAP_NO_PROGRESS`` is set."""

    def __init__(self, records: Path, trials: int):
        self.records, self.trials = records, trials
        self.base = self._count()
        self._stop = None
        self._thread = None

    def _count(self) -> int:
        try:
            with open(self.records, "rb") as fh:
                return sum(1 for _ in fh)
        except OSError:
            return 0

    def __enter__(self):
        import threading

        if os.environ.get("SOFTSWAP_NO_PROGRESS"):
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._stop = threading.Event()
        progress = Progress("tuning", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=False)

        def poll():
            with progress:
                task = progress.add_task("tuning", total=self.trials)
                while not self._stop.wait(1.0):
                    progress.update(task, completed=min(self.trials, self._count() - self.base))
                progress.update(task, completed=min(self.trials, self._count() - self.base))

        self._thread = threading.Thread(target=poll, name="softswap-tuning-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        return False


def _random_args(func) -> list:
    import numpy as np

    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    rng = np.random.default_rng(0)
    args = []
    for info in ArgInfo.from_prim_func(func):
        shape = [int(d) for d in info.shape]
        args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(str(info.dtype))))
    return args


def time_primfunc(mod: tvm.IRModule, target: tvm.target.Target, repeat: int = 15) -> float:
    """Median seconds of one call of ``mod["main"]`` (a scheduled PrimFunc) on random inputs."""
    import numpy as np

    lib = tvm.compile(mod, target=target)
    args = _random_args(mod["main"])
    fn = lib["main"]
    for _ in range(2):
        fn(*args)
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - t)
    return float(np.median(samples))


def _mean_secs(run_secs) -> float:
    vals = [float(x) for x in run_secs]
    return sum(vals) / len(vals) if vals else float("inf")


def select_records(work_dir: str | os.PathLike, target: tvm.target.Target, timer=None) -> list[dict]:
    """Write to ``selected_dir(work_dir)`` a database holding, for each tuned task, its best record if that runs
    faster than the hand rules' schedule of the same PrimFunc; returns one ``{"task", "tuned_ms", "rule_ms",
    "applied"}`` per task.  ``timer(mod, target) -> seconds`` times both (default :func:`time_primfunc`, this
    machine; remote tuning passes :func:`targets.rpc_tuning.remote_timer`).  The selected files are line copies of the tuning database's own (every workload line,
    the winning record lines), so their format is MetaSchedule's."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm_ffi import structural_hash

    from .cpu_rules import cpu_rules

    work = Path(work_dir)
    wl_lines = (work / "database_workload.json").read_text().splitlines()
    rec_lines = (work / "database_tuning_record.json").read_text().splitlines()
    index_of_hash = {int(json.loads(line)[0]): i for i, line in enumerate(wl_lines) if line.strip()}
    best_line: dict[int, tuple[float, str]] = {}
    for line in rec_lines:
        if not line.strip():
            continue
        idx, rec = json.loads(line)
        cost = _mean_secs(rec[1])
        if idx not in best_line or cost < best_line[idx][0]:
            best_line[idx] = (cost, line)
    db = ms.database.JSONDatabase(work_dir=str(work))
    mods = {}
    for rec in db.get_all_tuning_records():
        mods.setdefault(int(structural_hash(rec.workload.mod)), rec.workload.mod)
    report, chosen = [], []
    for shash, mod in mods.items():
        idx = index_of_hash.get(shash)
        if idx is None or idx not in best_line or best_line[idx][0] >= 1e9:  # 1e10 marks failed candidates
            continue
        sch = db.query_schedule(mod, target, "main")
        if sch is None:
            continue
        with target:
            rule = dl.ApplyDefaultSchedule(*cpu_rules())(mod)
        timed = timer or time_primfunc
        tuned_s = timed(sch.mod, target)
        rule_s = timed(rule, target)
        applied = tuned_s < rule_s
        if applied:
            chosen.append(best_line[idx][1])
        shapes = " ".join(str([int(d) for d in a.shape]) for a in ArgInfo.from_prim_func(mod["main"]))
        report.append({"task": f"matmul {shapes}", "tuned_ms": round(tuned_s * 1e3, 4),
                       "rule_ms": round(rule_s * 1e3, 4), "applied": applied})
        log.info("task %s: tuned %.3f ms, rule %.3f ms -> %s", shapes, tuned_s * 1e3, rule_s * 1e3,
                 "tuned" if applied else "rule")
    out_dir = Path(selected_dir(work))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in (("database_workload.json", wl_lines), ("database_tuning_record.json", chosen)):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, out_dir / name)
    return report
