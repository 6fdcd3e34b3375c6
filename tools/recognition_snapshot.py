"""Dump the recognition of every zoo entry (every exporter, negative twins included) to JSON.

Maintainer script: run before and after a recognizer change and diff the two files; recognition must not change
except for intended new accepts. Not imported by the library.

    PYTHONPATH=. python tools/recognition_snapshot.py OUT.json [--skip-slow] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _zoo():
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "tests" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = module
    spec.loader.exec_module(module)
    return module


def _num(x):
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 9)
    return x


def snapshot_of(report) -> dict:
    """The JSON-able recognition of one inspect report (sites with their fields, heads, unmatched with reasons)."""
    rec = report.recognition
    sites = []
    for s in rec.attention_sites:
        row = {k: _num(v) for k, v in s.summary().items()}
        row["k_transposed"] = s.k_transposed
        row["mask_terms"] = [t.mode for t in s.mask_terms]
        sites.append(row)
    out = {"softmax_count": rec.softmax_count, "sites": sites,
           "heads": [h.summary() for h in rec.heads],
           "unmatched": [{"softmax": n, **r.summary()} for n, r in rec.unmatched],
           "unknown_ops": dict(sorted(rec.unknown_ops.items()))}
    if getattr(rec, "nms_sites", None) or getattr(rec, "nms_unmatched", None):  # only where there are any
        out["nms_sites"] = [s.summary() for s in rec.nms_sites]
        out["nms_unmatched"] = [{"nms": n, **r.summary()} for n, r in rec.nms_unmatched]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--skip-slow", action="store_true")
    ap.add_argument("--only", default="")
    args = ap.parse_args(argv)
    zoo = _zoo()
    import rewrite
    from rewrite.io import from_exported_program, load_onnx
    only = {n for n in args.only.split(",") if n}
    result = {}
    for zm in zoo.ZOO:
        if (only and zm.name not in only) or (args.skip_slow and zm.slow):
            continue
        for exporter in zm.exporters:
            key = f"{zm.name}/{exporter}"
            start = time.perf_counter()
            try:
                if exporter == "fx":
                    loaded = from_exported_program(zoo.export_fx(zm), source=zm.name)
                else:
                    loaded = load_onnx(zoo.export_onnx(zm, exporter))
                result[key] = snapshot_of(rewrite.inspect(loaded))
            except Exception as exc:  # noqa: BLE001 - recorded, so a crash is a diff too
                result[key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{key}: {len(result[key].get('sites', []))} sites ({time.perf_counter() - start:.1f}s)",
                  flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
