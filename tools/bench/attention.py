#!/usr/bin/env python
"""Benchmark every attention variant against softmax SDPA (script; not imported by the library).

For N in {256, 1024, 4096, 16384} (``--quick``: {256, 1024}), d = 64, H = 8, B = 1, non-causal and causal, it times
torch eager (``torch.nn.functional.scaled_dot_product_attention`` as the baseline) and onnxruntime with 1 and 2 intra-op
threads (ONNX from exporting the variant function with a dynamic sequence length). It reports the median of
``--runs`` timed runs after ``--warmup`` runs, the ratio to softmax on the same backend, and the first N at which
each variant is faster than softmax. Combinations estimated to need more than ``--max-gb`` of memory or more than
``--max-seconds`` are skipped with the reason in the table.

Usage: ``python tools/bench/attention.py [--quick] [--out tools/bench/results/attention.json]``
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from passes.attention import VARIANTS  # noqa: E402
from machine import describe  # noqa: E402  (tools/bench/machine.py: the CPU line of every table)

D, H, B = 64, 8, 1
BASELINE = "softmax"
# rough number of live fp32 (B·H·N·N) score-sized tensors per quadratic variant (peak memory estimate)
QUADRATIC = {"softmax": 1, "reference": 4, "sigmoid": 4, "softplus": 6}


def estimate_gb(name: str, n: int, causal: bool, backend: str) -> float:
    """Peak memory estimate in GB (scores for quadratic variants; prefix states for traced causal linear forms)."""
    if name == BASELINE and backend == "torch":
        return B * H * n * D * 4 * 8 / 1e9  # fused SDPA: O(N)
    if name in QUADRATIC:
        return QUADRATIC[name] * B * H * n * n * 4 / 1e9
    if name in ("linear", "mala") and causal and backend.startswith("ort"):
        return 2 * B * H * 2 * n * D * (D + 1) * 4 / 1e9  # traced 'prefix' form on the S+T axis
    if name == "soft":
        return 4 * B * H * n * 64 * 4 / 1e9
    return 4 * B * H * n * (D + 1) * 4 / 1e9


class _Wrap(torch.nn.Module):
    def __init__(self, name: str, causal: bool):
        super().__init__()
        self.name, self.causal = name, causal

    def forward(self, q, k, v):
        if self.name == BASELINE:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return VARIANTS[self.name].fn(q, k, v, scale=D ** -0.5, causal=self.causal, key_padding=None)


def _time(call, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _export(mod: _Wrap, path: str) -> None:
    dim = torch.export.Dim("N", min=2, max=1 << 20)
    # three distinct example tensors: passing one tensor as q, k and v makes the exporter alias the inputs, and the
    # graph then computes every branch from a single input (φ(k) = φ(q), so one feature map is silently dropped)
    xs = tuple(torch.randn(B, H, 128, D) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onx = torch.onnx.export(mod, xs, dynamic_shapes={"q": {2: dim}, "k": {2: dim}, "v": {2: dim}},
                                dynamo=True, opset_version=18, verbose=False)
    onx.save(path)


def run(args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    torch.set_num_threads(2)
    ns = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
    names = [BASELINE] + [n for n in (args.variants or VARIANTS) if n != "reference" or args.with_reference]
    backends = ["torch"] + ([] if args.no_onnx else ["ort1", "ort2"])
    records = []
    tmp = tempfile.mkdtemp(prefix="softswap_bench_")
    for causal in (False, True):
        for name in names:
            if name != BASELINE and causal and "causal" not in VARIANTS[name].mask_kinds:
                for be in backends:
                    for n in ns:
                        records.append(dict(variant=name, causal=causal, backend=be, n=n, ms=None,
                                            skipped="mask kind causal not supported"))
                continue
            mod = _Wrap(name, causal)
            sessions = {}
            if not args.no_onnx:
                path = os.path.join(tmp, f"{name}_{int(causal)}.onnx")
                try:
                    _export(mod, path)
                    for th in (1, 2):
                        so = ort.SessionOptions()
                        so.intra_op_num_threads = th
                        so.inter_op_num_threads = 1
                        so.log_severity_level = 3
                        sessions[f"ort{th}"] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                except Exception as exc:  # report, keep benchmarking the rest
                    logging.warning("export of %s causal=%s failed: %s", name, causal, exc)
            for be in backends:
                prev = None
                for n in ns:
                    rec = dict(variant=name, causal=causal, backend=be, n=n, ms=None, skipped="")
                    records.append(rec)
                    gb = estimate_gb(name, n, causal, be)
                    if gb > args.max_gb:
                        rec["skipped"] = f"memory ~{gb:.1f} GB > {args.max_gb}"
                        continue
                    if prev is not None:
                        pn, pms = prev
                        grow = (n / pn) ** (2 if name in QUADRATIC or name == BASELINE else 1)
                        est = pms * grow * (args.runs + args.warmup) / 1e3
                        if est > args.max_seconds:
                            rec["skipped"] = f"time ~{est:.0f} s > {args.max_seconds}"
                            continue
                    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
                    if be == "torch":
                        with torch.inference_mode():
                            ms = _time(lambda: mod(q, k, v), args.runs, args.warmup)
                    else:
                        sess = sessions.get(be)
                        if sess is None:
                            rec["skipped"] = "export failed"
                            continue
                        feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), (q, k, v))}
                        ms = _time(lambda: sess.run(None, feeds), args.runs, args.warmup)
                    rec["ms"] = round(ms, 3)
                    prev = (n, ms)
                    print(f"  {name:9s} causal={int(causal)} {be:5s} N={n:6d} {ms:10.2f} ms", file=sys.stderr)
    base = {(r["causal"], r["backend"], r["n"]): r["ms"] for r in records if r["variant"] == BASELINE}
    crossover = {}
    for r in records:
        b = base.get((r["causal"], r["backend"], r["n"]))
        r["ratio"] = round(r["ms"] / b, 3) if r["ms"] and b else None
    for r in sorted(records, key=lambda r: r["n"]):
        key = f"{r['variant']}|causal={int(r['causal'])}|{r['backend']}"
        if r["variant"] != BASELINE and r["ratio"] is not None and r["ratio"] < 1 and key not in crossover:
            crossover[key] = r["n"]
    for r in records:
        key = f"{r['variant']}|causal={int(r['causal'])}|{r['backend']}"
        if r["variant"] != BASELINE:
            crossover.setdefault(key, None)
    return dict(config=dict(d=D, heads=H, batch=B, ns=ns, runs=args.runs, warmup=args.warmup,
                            torch_threads=2, torch=torch.__version__, ort=ort.__version__),
                results=records, overtakes_softmax_at_n=crossover)


def print_table(res: dict) -> None:
    ns = res["config"]["ns"]
    head = f"{'variant':9s} {'causal':6s} {'backend':7s} " + " ".join(f"{'N=' + str(n):>22s}" for n in ns) + "  overtakes"
    print(head)
    print("-" * len(head))
    rows = {}
    for r in res["results"]:
        rows.setdefault((r["variant"], r["causal"], r["backend"]), {})[r["n"]] = r
    for (name, causal, be), by_n in rows.items():
        cells = []
        for n in ns:
            r = by_n.get(n)
            if r is None or r["ms"] is None:
                cells.append(f"{'skip: ' + (r['skipped'] if r else '?'):>22.22s}")
            elif r["ratio"] is None or name == BASELINE:
                cells.append(f"{r['ms']:>12.2f} ms         ")
            else:
                cells.append(f"{r['ms']:>12.2f} ms ({r['ratio']:5.2f}x)")
        x = res["overtakes_softmax_at_n"].get(f"{name}|causal={int(causal)}|{be}")
        print(f"{name:9s} {int(causal)!s:6s} {be:7s} " + " ".join(cells) + f"  {'' if name == BASELINE else (x or '-')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N up to 1024 (smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.json"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="*", help="subset of variant names")
    ap.add_argument("--with-reference", action="store_true", help="also time the unfused reference softmax")
    ap.add_argument("--no-onnx", action="store_true", help="torch eager only")
    ap.add_argument("--max-gb", type=float, default=8.0)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    res = run(args)
    res["config"]["cpu"] = describe()
    print(f"CPU: {res['config']['cpu']}")
    print_table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
