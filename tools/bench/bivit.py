"""BiViT accuracy on scikit-learn digits and the packed size of the binarised model.

A small Hugging Face ViT (8×8 images, patch 2, ``--hidden``, ``--layers``) is trained on the digits train split; then,
on the digits test split (never used for training nor QAT), this measures the top-1 accuracy of:

- ``float``: the full-precision model;
- ``binarised, before QAT``: ``binarize.bivit`` right after the pass (W1-32A and W1A1), no training (near chance is
  expected for W1A1: it is the starting point, not a result);
- ``after QAT``: :func:`passes.transfer.bivit.qat` for ``--steps`` steps with distillation from the float model
  (KL on logits at ``--temperature``, staged: attention first, MLP from half-way), labels unused;

plus the size of the binarised model (binary weights packed 1 bit each + float32 scales, against float32) and
the agreement of the exported ONNX (onnxruntime) with the FX program of the W1A1 model. The 1-bit kernel timing
is tools/bench/bivit_kernel.py.

Usage::

    .venv/bin/python tools/bench/bivit.py [--steps 1000] [--hidden 48] [--layers 2] [--seed 0]
        [--out tools/bench/results/bivit.json]

Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402  (tools/bench/machine.py: the CPU line of every table)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(-1) == y).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="QAT steps per stage configuration")
    parser.add_argument("--hidden", type=int, default=48)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20, help="float training epochs")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernel", action="store_true",
                        help="also time the ViT-Base binary linear on the 1-bit kernel (tools/bench/bivit_kernel.py)")
    parser.add_argument("--out", default=str(ROOT / "tools/bench/results/bivit.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("torch", "torch.onnx", "torch._export", "torch.export", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort
    from rich.console import Console
    from rich.table import Table

    from passes.transfer.bivit import qat
    from rewrite import api
    from tests.digits_models import digits_split
    from tests.vit_digits import export_vit, fx_logits, trained_digits_vit, vit_accuracy

    console = Console(highlight=False)
    console.print(f"CPU: {describe()}")
    t0 = time.time()
    split = digits_split()
    model = trained_digits_vit(seed=args.seed, epochs=args.epochs, hidden=args.hidden, layers=args.layers)
    loaded = export_vit(model)
    rows: list[dict[str, Any]] = [{"model": "float", "stage": "-", "qat_steps": 0,
                                   "accuracy": vit_accuracy(model, split.x_test, split.y_test)}]
    size = None
    agreement: dict[str, Any] = {}
    for stage in ("1w32a", "w1a1"):
        before, report = api.convert(loaded, binarize="bivit", options={"stage": stage}, verify=False)
        size = report["passes"][0]["size"]
        rows.append({"model": "binarised, before QAT", "stage": stage, "qat_steps": 0,
                     "accuracy": _accuracy(fx_logits(before, split.x_test), split.y_test)})
        start = time.time()
        after, qreport = qat(loaded, data={"pixel_values": split.x_train}, options={"stage": stage},
                             steps=args.steps, seed=args.seed, lr=args.lr, temperature=args.temperature,
                             progress=False)
        logits = fx_logits(after, split.x_test)
        rows.append({"model": "after QAT (distilled)", "stage": stage, "qat_steps": qreport["steps"],
                     "accuracy": _accuracy(logits, split.y_test), "qat_seconds": round(time.time() - start, 1),
                     "held_out_agreement_with_float": qreport["after"]["agreement"]})
        if stage == "w1a1":
            with tempfile.TemporaryDirectory() as tmp:
                path = api.export(after, Path(tmp) / "bivit.onnx")
                got = ort.InferenceSession(str(path)).run(None, {"pixel_values": split.x_test})[0]
            diff = np.abs(got - logits).max(axis=-1)
            agreement = {"max_abs": float(diff.max()), "samples_over_1e-4": int((diff > 1e-4).sum()),
                         "argmax_agreement": float((got.argmax(-1) == logits.argmax(-1)).mean())}
    table = Table(title=f"BiViT on digits (test split, {len(split.y_test)} images, chance 0.10): ViT hidden "
                        f"{args.hidden}, {args.layers} layers, QAT {args.steps} steps")
    for col in ("model", "stage", "QAT steps", "top-1 accuracy"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["stage"], str(r["qat_steps"]), f"{r['accuracy']:.3f}")
    console.print(table)
    b = size["binary_linears"]
    console.print(f"size: binary linears {b['float_bytes']} B float32 -> {b['packed_bytes']} B packed + "
                  f"{b['scale_bytes']} B scales ({b['ratio']}x); whole model {size['float_bytes']} B -> "
                  f"{size['binarized_bytes']} B ({size['ratio']}x; patch embedding, norms, classifier, biases float)")
    console.print(f"W1A1 export: onnxruntime vs FX on the test split: max abs {agreement['max_abs']:.2e}, "
                  f"{agreement['samples_over_1e-4']} samples over 1e-4, argmax agreement "
                  f"{agreement['argmax_agreement']:.4f}")
    kernel = None
    if args.kernel:  # the 1-bit kernel against the float linear (TVM and onnxruntime), ViT-Base size
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bivit_kernel
        kernel = bivit_kernel.measure()
        for line in bivit_kernel.table_lines(kernel):
            console.print(line)
    result = {"benchmark": "bivit", "machine": platform.platform(), "cpu": describe(), "config": vars(args),
              "rows": rows, "size": size, "onnx_vs_fx": agreement, "kernel": kernel,
              "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
