"""Mahalanobis OOD detection (pass ``ood.mahalanobis``) vs the maximum-softmax baseline on a real small task.

Task: the digits CNN of ``tests/digits_models.py`` (trained in-process on the digits train split). In-distribution
test inputs: the digits test split (540). OOD inputs (``tests/ood_data.py``): scikit-image's ``lfw_subset`` faces
resized to 8×8 and patches of its shipped photographs (camera, coins, moon, ...), scaled like the digits. The OOD
inputs are split in two halves (seeded): one is the pass's ``x_ood`` (it fits the layer weights on it, with half
of the held-out digits), the other is only scored here. Every row is scored on the same test inputs: digits test
split vs the OOD test half (and its faces / photographs parts separately).

Rows: the max-softmax baseline (score −max_c softmax); each feature tap alone (−M_ℓ); the ensemble with equal
weights on z-scored layer scores (no OOD data); the logistic-regression ensemble (the pass with ``x_ood``); that
ensemble with input pre-processing (one signed-gradient step ε per layer, torch path; layer weights kept from ε = 0).
Metrics (percent): AUROC, TNR at 95% TPR, detection accuracy, AUPR-in, AUPR-out; scores are HIGHER = MORE OOD.
Also timed: the pass (capture + fit + splice) and onnxruntime inference with and without the ``ood_score`` output.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/ood.py [--seed 0] [--out tools/bench/results/ood.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from digits_models import digits_split, export_fx, export_onnx, trained_digits_cnn  # noqa: E402
from machine import describe  # noqa: E402  (tools/bench/machine.py: the CPU line of every table)
from ood_data import lfw_patches, texture_patches  # noqa: E402
from passes.ood import preprocess  # noqa: E402
from passes.ood.mahalanobis_pass import MahalanobisPass  # noqa: E402
from passes.ood.metrics import METRICS, ood_metrics  # noqa: E402
from rewrite.api import graph_view  # noqa: E402
from rewrite.capture import capture_values  # noqa: E402
from rewrite.fit_data import load_fit_data  # noqa: E402
from rewrite.verify import run  # noqa: E402

log = logging.getLogger("bench.ood")
EPSILONS = (0.0005, 0.002, 0.01)


def _halves(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(len(x))
    return x[perm[: len(x) // 2]], x[perm[len(x) // 2:]]


def _ort_ms(path: Path, x: np.ndarray, repeats: int = 20) -> float:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.run(None, {"x": x})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"x": x})
    return (time.perf_counter() - start) / repeats * 1e3


def bench(seed: int, workdir: Path) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    split = digits_split()
    faces_fit, faces_test = _halves(lfw_patches(), rng)
    photos_fit, photos_test = _halves(texture_patches(), rng)
    ood_fit, ood_test = np.concatenate([faces_fit, photos_fit]), np.concatenate([faces_test, photos_test])
    model = trained_digits_cnn(seed=seed)
    loaded = export_fx(model)
    data = load_fit_data({"x": split.x_train, "y": split.y_train, "x_ood": ood_fit}, ["x"])
    start = time.perf_counter()
    lr_pass = MahalanobisPass(fit=data, options={"seed": seed})
    lr_result = lr_pass.run(loaded)
    fit_seconds = time.perf_counter() - start
    eq_pass = MahalanobisPass(fit=load_fit_data({"x": split.x_train, "y": split.y_train}, ["x"]),
                              options={"seed": seed})
    eq_result = eq_pass.run(loaded)

    x = np.concatenate([split.x_test, ood_test])
    n_in, n_faces = len(split.x_test), len(faces_test)
    sets = {"all OOD": slice(n_in, len(x)), "faces": slice(n_in, n_in + n_faces),
            "photos": slice(n_in + n_faces, len(x))}
    out = run(lr_result.model, {"x": x})
    logits = out["logits"].astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    scores: dict[str, np.ndarray] = {"max-softmax baseline": -1.0 / np.exp(z).sum(axis=1)}
    g, _ = graph_view(loaded)
    by_name = {n.name: n for n in g.gm.graph.nodes}
    det = lr_pass.detector
    layer = det.layer_scores(capture_values(loaded, g, [by_name[t] for t in det.taps], {"x": x}))
    for i, tap in enumerate(det.taps):
        scores[f"Mahalanobis, tap{i} ({tap}) alone"] = -layer[:, i]
    scores["Mahalanobis ensemble, equal weights (no OOD data)"] = run(eq_result.model, {"x": x})["ood_score"]
    scores["Mahalanobis ensemble, logistic regression"] = out["ood_score"]
    for eps in EPSILONS:
        scores[f"  + input pre-processing, eps={eps}"] = preprocess(model, det, x, eps=eps)

    rows = []
    for method, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        row: dict[str, Any] = {"method": method}
        for name, part in sets.items():
            row[name] = ood_metrics(s[:n_in], s[part])
        rows.append(row)

    onnx_path = export_onnx(model, workdir / "digits.onnx")
    from rewrite.api import export
    onnx_ood = export(lr_result.model, workdir / "digits_ood.onnx")
    batch = x[:256]
    timing = {"pass_seconds": fit_seconds, "ort_ms_batch256_original": _ort_ms(onnx_path, batch),
              "ort_ms_batch256_with_ood_score": _ort_ms(onnx_ood, batch)}
    return {"machine": describe(), "python": platform.python_version(), "seed": seed,
            "in_distribution": f"digits test split ({n_in})",
            "ood_test": {"faces": n_faces, "photos": len(x) - n_in - n_faces},
            "ood_fit_samples": len(ood_fit), "fit_samples": len(split.x_train),
            "taps": lr_result.report["sites"], "ensemble_bias": lr_result.report["bias"],
            "rows": rows, "timing": timing}


def print_table(result: dict[str, Any]) -> None:
    print(f"Mahalanobis OOD on the digits CNN — {result['machine']}")
    print(f"in-distribution: {result['in_distribution']}; OOD test: {result['ood_test']['faces']} faces + "
          f"{result['ood_test']['photos']} photo patches (the other half of each fitted the layer weights)")
    heads = ("AUROC", "TNR@95", "det.acc", "AUPR-in", "AUPR-out")
    width = max(len(r["method"]) for r in result["rows"])
    for part in ("all OOD", "faces", "photos"):
        print(f"\n[{part}]  (percent; scores: higher = more likely OOD)")
        print(f"{'method':<{width}}  " + "  ".join(f"{h:>8}" for h in heads))
        for row in result["rows"]:
            print(f"{row['method']:<{width}}  " + "  ".join(f"{100 * row[part][m]:8.1f}" for m in METRICS))
    print("\nlayer weights (alpha on raw M_l; beta on z-scored):")
    for tap in result["taps"]:
        print(f"  {tap['name']} {tap['node']} ({tap['pool']}, D={tap['features']}): alpha={tap['weight']:.4g} "
              f"beta={tap['weight_z']:.4g}")
    t = result["timing"]
    print(f"\npass (capture + fit + splice): {t['pass_seconds']:.1f} s; onnxruntime, batch 256, 1 thread: "
          f"{t['ort_ms_batch256_original']:.2f} ms without / {t['ort_ms_batch256_with_ood_score']:.2f} ms with "
          "ood_score")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "tools" / "bench" / "results" / "ood.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(args.seed, Path(tmp))
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
