"""Scaling of attention transfer on the real all-MiniLM-L6-v2 (6 attention sites): ranks and disk-backed capture.

Two measurements, each run in fresh processes and **interleaved** (A B A B ...) so that load from other work on a
shared host hits both sides alike:

1. **ranks**: ``softswap transfer MINILM --attention linear`` — the default transfer (1024 calibration lines,
   stage 1 at 1500 steps per site, LoLCATs stage 2 at 600 steps, data-parallel over the ranks) unless ``--steps``,
   ``--rank-samples`` or ``--stage2-steps`` say otherwise (``--rank-samples 96 --stage2-steps 0`` is session 6's
   stage-1-only setup) — with 1 process and with ``--nproc 2`` (torch.distributed gloo ranks, 1 torch thread each). Reported: end-to-end wall time of the command, the report's ``fit_seconds``
   (load + calibration + capture + fit, on rank 0 including the wait for rank 1's sites) and rank 0's wall time per
   phase (``report["phases"]``: load, calibration, capture, fit, gather, rewrite, stage2, model_fidelity, export),
   so the serial part (Amdahl) is visible, and rank 0's stage-2 split (``report["stage2"]["timing"]``: teacher,
   forward, backward, reduce, optimizer). Per rank: model load, calibration text and capture are not split; the
   fits are (by site); stage 2 is split by batch rows; rank 0 measures the fitted model and exports while the last
   rank measures the untrained swap's model fidelity.
2. **memory**: peak RSS (psutil, sampled every 25 ms, minus the RSS right after import) of :func:`transfer` on a
   calibration set of ``--samples`` sentences (1x, in RAM), 4x that (in RAM), and 4x with ``max_memory=0`` (every
   captured value on disk, :mod:`passes.transfer.capture_store`). Texts are truncated to ``--max-length`` tokens.

Usage::

    .venv/bin/python tools/bench/scale.py [--only ranks|memory] [--steps N] [--stage2-steps N] [--rank-samples N]
        [--repeats 2] [--samples 48] [--max-length 64]
        [--out tools/bench/results/scale.json]

Prints a table and writes JSON (with the CPU line of tools/bench/machine.py and the host load at start and end).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from machine import describe  # noqa: E402

_RSS_CHILD = r'''
import json, sys, psutil
from passes.transfer import transfer
from rewrite.hf import minilm_path
n, max_memory, steps, max_length, folder = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
print(json.dumps({"base": psutil.Process().memory_info().rss}), flush=True)
_, report = transfer(minilm_path(), None, attention="linear", steps=steps, max_samples=n, max_length=max_length,
                     batch_size=16, progress=False, measure_model=False,
                     max_memory=None if max_memory == "none" else int(max_memory), checkpoint=None,
                     stage2_steps=0)
report.pop("sites", None)
print(json.dumps({"fit_seconds": report["fit_seconds"], "capture": report.get("capture")}), flush=True)
'''


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TVM_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


#: Sampling rate of the process-tree RSS watcher in the ranks measurement. At 40 Hz the watcher (psutil walks /proc
#: for the tree, then reads each process) took ~4-5 % of a core: free in the 1-rank run (the second core idles) but
#: taken from one of the ranks in the 2-rank run, whose partner then waited for it (gather, stage-2 reduce).
RANKS_WATCH_HZ = 2.0


def _watch(cmd: list[str], hz: float = 40.0) -> tuple[subprocess.CompletedProcess[str], float, int, int | None]:
    """Run ``cmd``; (result, wall seconds, peak RSS of the process tree sampled ``hz`` times a second, RSS at the
    child's first printed line)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=_env(), cwd=ROOT)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(1.0 / hz)  # the watcher itself must not load the 2 cores it measures
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    if res.returncode != 0:
        raise SystemExit(f"scale.py: {' '.join(cmd[:6])}... failed: {res.stderr.strip()[-800:]}")
    return res, wall, peak, None


def warm_corpus() -> float:
    """Build the default calibration text's file cache (:mod:`passes.transfer.corpus_cache`) once before the timed
    runs, so the 1- and 2-rank runs both find it warm (as every transfer after the first on a machine does)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from passes.transfer.corpus import offline_corpus\n"
                    "from passes.transfer.corpus_cache import cached_corpus\ncached_corpus('offline', offline_corpus)"],
                   check=True, env=_env(), cwd=ROOT)
    return round(time.perf_counter() - t0, 2)


def ranks(args: argparse.Namespace, minilm: str, folder: Path) -> dict[str, Any]:
    rows: dict[str, list[dict[str, float]]] = {"1": [], "2": []}
    for rep in range(args.repeats):
        for n in ("1", "2"):
            report = folder / f"r{n}-{rep}.json"
            # None: the transfer's own default for each knob
            knobs = [(flag, value) for flag, value in (("--steps", args.steps), ("--max-samples", args.rank_samples),
                                                         ("--stage2-steps", args.stage2_steps)) if value is not None]
            cmd = [sys.executable, "-m", "rewrite.cli", "transfer", minilm, "-o", str(folder / f"o{n}.pt2"),
                   "--attention", "linear", *[str(x) for kv in knobs for x in kv],
                   "--no-progress", "--report", str(report)] + (["--nproc", n] if n != "1" else [])
            _, wall, peak, _ = _watch(cmd, hz=RANKS_WATCH_HZ)
            rep_json = json.loads(report.read_text())
            phases = rep_json.get("phases", {})
            rows[n].append({"wall_s": round(wall, 2), "fit_s": rep_json["fit_seconds"],
                            "stage2": {k: rep_json.get("stage2", {}).get(k) for k in
                                       ("steps", "loss_first", "loss_last", "data_parallel_ranks", "timing")},
                            "peak_rss_mb": round(peak / 2 ** 20, 1), "steps": rep_json["steps"],
                            "phases_rank0_s": phases, "load_avg_1min": round(os.getloadavg()[0], 2)})
            outside = wall - sum(phases.values())  # process start, imports and, with --nproc, the launcher
            rows[n][-1]["outside_phases_s"] = round(outside, 2)
            print(f"  ranks={n} rep {rep}: wall {wall:.1f}s, fit {rep_json['fit_seconds']:.1f}s; rank 0 phases "
                  + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + f"; outside phases {outside:.1f}",
                  flush=True)
            timing = rep_json.get("stage2", {}).get("timing") or {}
            if timing:  # where rank 0's stage-2 seconds went (reduce includes waiting for the slower rank)
                print("    stage 2 on rank 0, s: " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()), flush=True)
    best = {n: {k: min(r[k] for r in rs) for k in ("wall_s", "fit_s")} for n, rs in rows.items()}
    # the ratio of each interleaved pair (same load on both sides) besides the best-of ratio
    pairs = [round(a["wall_s"] / b["wall_s"], 3) for a, b in zip(rows["1"], rows["2"])]
    return {"runs": rows, "best": best, "speedup_fit": round(best["1"]["fit_s"] / best["2"]["fit_s"], 3),
            "speedup_wall": round(best["1"]["wall_s"] / best["2"]["wall_s"], 3), "speedup_wall_pairs": pairs}


def memory(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    configs = [("in RAM, 1x", args.samples, "none"), ("in RAM, 4x", 4 * args.samples, "none"),
               ("disk, 4x", 4 * args.samples, "0")]
    out: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in configs}
    for rep in range(args.repeats):
        for name, n, mm in configs:
            cmd = [sys.executable, "-c", _RSS_CHILD, str(n), mm, str(args.rss_steps), str(args.max_length),
                   str(folder)]
            res, wall, peak, _ = _watch(cmd)
            lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
            base = lines[0]["base"]
            out[name].append({"samples": n, "peak_rss_mb": round(peak / 2 ** 20, 1),
                              "growth_mb": round((peak - base) / 2 ** 20, 1), "wall_s": round(wall, 2),
                              "capture": lines[-1].get("capture")})
            print(f"  {name}: peak {peak / 2 ** 20:.0f} MiB (+{(peak - base) / 2 ** 20:.0f} over import)", flush=True)
    return {name: {"runs": runs, "min_growth_mb": min(r["growth_mb"] for r in runs)} for name, runs in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None,
                    help="fit steps per site (ranks measurement; default: the transfer's default, 1500)")
    ap.add_argument("--rank-samples", type=int, default=None,
                    help="calibration sentences (ranks measurement; default: the transfer's default, 1024)")
    ap.add_argument("--stage2-steps", type=int, default=None,
                    help="LoLCATs stage-2 steps (ranks measurement; default: the transfer's default, 600; 0 = off)")
    ap.add_argument("--rss-steps", type=int, default=5, help="fit steps per site (memory measurement)")
    ap.add_argument("--samples", type=int, default=48, help="1x calibration sentences (memory measurement)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", choices=("ranks", "memory"))
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()
    from rewrite.hf import minilm_path
    minilm = str(minilm_path())
    load0 = os.getloadavg()
    print(f"{describe()}; load average at start {load0[0]:.2f} (shared host: other work runs beside this)")
    result: dict[str, Any] = {"machine": describe(), "cpus": os.cpu_count(), "load_start": load0,
                              "settings": vars(args), "shared_host": True}
    with tempfile.TemporaryDirectory(prefix="softswap-scale-") as tmp:
        if args.only in (None, "ranks"):
            print(f"ranks: MiniLM, linear (Hedgehog), {args.steps or 'default'} steps/site, stage 2 "
                  f"{'default' if args.stage2_steps is None else args.stage2_steps} steps, "
                  f"{args.rank_samples or 'default'} sentences")
            warm = warm_corpus()
            print(f"  calibration corpus cache warmed ({warm:.1f}s incl. process start)")
            result["ranks"] = ranks(args, minilm, Path(tmp))
            result["ranks"]["corpus_cache_warmup_s"] = warm
        if args.only in (None, "memory"):
            print(f"memory: MiniLM, {args.samples} vs {4 * args.samples} sentences, max length {args.max_length}")
            result["memory"] = memory(args, Path(tmp))
    result["load_end"] = os.getloadavg()
    print()
    if "ranks" in result:
        r = result["ranks"]
        print(f"{'ranks':>6} {'wall s (best)':>14} {'fit s (best)':>13}")
        for n in ("1", "2"):
            print(f"{n:>6} {r['best'][n]['wall_s']:>14.1f} {r['best'][n]['fit_s']:>13.1f}")
        print(f"speedup at 2 ranks: fit {r['speedup_fit']:.2f}x, end to end {r['speedup_wall']:.2f}x "
              f"(interleaved pairs: {r['speedup_wall_pairs']})")
        for n in ("1", "2"):
            run = min(r["runs"][n], key=lambda x: x["wall_s"])
            print(f"  rank 0 phases at {n} rank(s), s: " + ", ".join(f"{k} {v:.1f}"
                                                                for k, v in run["phases_rank0_s"].items()))
    if "memory" in result:
        print(f"{'capture':>12} {'samples':>8} {'peak RSS growth MiB (min)':>27}")
        for name, m in result["memory"].items():
            print(f"{name:>12} {m['runs'][0]['samples']:>8} {m['min_growth_mb']:>27.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}; load average at end {result['load_end'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
