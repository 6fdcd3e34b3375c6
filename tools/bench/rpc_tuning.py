#!/usr/bin/env python
"""Local vs remote MetaSchedule tuning of one MatMul (script; not imported by the library).

Starts a TVM RPC tracker and ``--servers`` RPC servers on 127.0.0.1 (``TVM_NUM_THREADS=1`` each), then tunes the
same ``--n``x``--n`` MatMul model with ``--trials`` trials locally (``softswap compile --tune``) and through the
tracker (``--rpc``), each into a fresh database, and prints the wall time of each step, the tuned and hand-rule
times of the task and whether the record was applied.  Loopback servers share this machine's CPUs: the numbers show
the RPC path's overhead and behaviour, not a cluster's speed-up.

Usage: ``python tools/bench/rpc_tuning.py [--trials 16] [--servers 2] [--out tools/bench/results/rpc_tuning.json]``
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("SOFTSWAP_NO_PROGRESS", "1")
from machine import describe  # noqa: E402  (tools/bench/machine.py: the CPU line of every table)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--out", default="tools/bench/results/rpc_tuning.json")
    args = ap.parse_args()

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from targets import compile_model
    from targets.rpc_tuning import RemoteDevice, count_workers, tracker_summary

    n = args.n
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    procs = []
    env = dict(os.environ, TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="softswap-rpc-bench-") as tmp:
        tmp = Path(tmp)
        onnx.save(model, tmp / "mm.onnx")
        try:
            t0 = time.perf_counter()
            port = _free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                           "--port", str(port), "--port-end", str(port + 1), "--silent"],
                                          env=env, start_new_session=True, stderr=subprocess.DEVNULL))
            for _ in range(args.servers):
                p = _free_port()
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(p),
                     "--port-end", str(p + 1), "--tracker", f"127.0.0.1:{port}", "--key", "bench"],
                    env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            dev = RemoteDevice("127.0.0.1", port, "bench")
            while True:
                try:
                    if count_workers(tracker_summary(dev), "bench") >= args.servers:
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                if time.perf_counter() - t0 > 180:
                    raise TimeoutError("RPC servers did not register")
                time.sleep(0.5)
            start_s = time.perf_counter() - t0
            rows = []
            for name, remote in (("local", None), (f"rpc x{args.servers}", dev)):
                t = time.perf_counter()
                meta = compile_model(str(tmp / "mm.onnx"), "host", tmp / f"{name[:3]}.so", tune_trials=args.trials,
                                     tuning_dir=tmp / name.replace(" ", "_"), tune_remote=remote)
                task = meta["tuning"]["tasks"][0]
                rows.append({"mode": name, "wall_s": round(time.perf_counter() - t, 1),
                             "tuning_s": meta["tuning"]["seconds"], "tuned_ms": task["tuned_ms"],
                             "rule_ms": task["rule_ms"], "applied": task["applied"]})
        finally:
            for proc in procs:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
    print(f"{describe()}; MatMul {n}x{n}, {args.trials} trials; tracker + {args.servers} servers up in {start_s:.1f}s")
    print(f"{'mode':10s} {'wall s':>8s} {'tuning s':>9s} {'tuned ms':>9s} {'rule ms':>8s} applied")
    for r in rows:
        print(f"{r['mode']:10s} {r['wall_s']:8.1f} {r['tuning_s']:9.1f} {r['tuned_ms']:9.4f} {r['rule_ms']:8.4f} "
              f"{r['applied']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": describe(), "n": n, "trials": args.trials, "servers": args.servers,
                               "cluster_start_s": round(start_s, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
