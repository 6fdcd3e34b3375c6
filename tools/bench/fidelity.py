"""Sentence-embedding fidelity of attention replacements on the real all-MiniLM-L6-v2, before and after transfer.

For each configuration (variant + options) this measures, on held-out sentences never used for calibration:

- ``before``: the untrained swap (the transfer configuration with its initial parameters — identity Hedgehog maps,
  b = −ln n_ref, τ = 1, γ = 0.1);
- ``plain``: for linear / MALA, the parameter-free default swap (φ = elu+1), for reference;
- ``after``: the swap with parameters fitted by :func:`passes.transfer.fit_params` on calibration sentences;

as the mean (and minimum) cosine between the original and converted sentence embeddings — mean pooling of
``last_hidden_state`` over the tokens with ``attention_mask`` = 1, as sentence-transformers does. Calibration
sentences are the calibration split of the offline stdlib-docstring corpus (:mod:`passes.transfer.corpus`);
evaluation sentences are its held-out split (disjoint by construction).

Usage::

    .venv/bin/python tools/bench/fidelity.py [--steps N | --minutes M] [--calib 512] [--eval 256]
        [--configs linear,mala,...] [--out tools/bench/results/fidelity.json]

Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from machine import describe  # noqa: E402  (tools/bench/machine.py: the CPU line of every table)
from passes.attention import get_variant  # noqa: E402
from passes.transfer import fit_params, stdlib_corpus, transfer_options  # noqa: E402
from passes.transfer.data import tokenize_lines  # noqa: E402
from rewrite.attention_pass import AttentionRewritePass  # noqa: E402
from rewrite.hf import minilm_path  # noqa: E402
from rewrite.io import load_model  # noqa: E402
from rewrite.verify import run as run_model  # noqa: E402

log = logging.getLogger("bench.fidelity")

#: name -> (variant, options, hybrid window)
CONFIGS: dict[str, tuple[str, dict[str, Any], int]] = {
    "linear": ("linear", {}, 0),
    "mala": ("mala", {}, 0),
    "sigmoid": ("sigmoid", {}, 0),
    "softplus": ("softplus", {}, 0),
    "linear+window8": ("linear", {}, 8),
    "mala+window8": ("mala", {}, 8),
}


def embeddings(model: Any, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Mean-pooled sentence embeddings (attention-mask weighted) of every batch, float64."""
    out = []
    for batch in batches:
        hidden = np.asarray(run_model(model, batch)[model.output_names[0]], dtype=np.float64)
        mask = batch["attention_mask"].astype(np.float64)[..., None]
        out.append((hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None))
    return out


def cosines(ref: list[np.ndarray], cand: list[np.ndarray]) -> np.ndarray:
    """Per-sentence cosine between two lists of (batch, dim) embedding blocks."""
    a, b = np.concatenate(ref), np.concatenate(cand)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _stats(c: np.ndarray) -> dict[str, float]:
    return {"mean": float(c.mean()), "min": float(c.min()), "p10": float(np.percentile(c, 10))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps per site (default 400)")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock fitting budget per configuration")
    parser.add_argument("--calib", type=int, default=512, help="calibration sentences (default 512)")
    parser.add_argument("--eval", type=int, default=256, help="held-out evaluation sentences (default 256)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list from {list(CONFIGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "tools/bench/results/fidelity.json"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    steps = args.steps if args.steps is not None or args.minutes is not None else 400

    from rich.console import Console
    from rich.table import Table
    console = Console(highlight=False)

    t0 = time.time()
    loaded = load_model(minilm_path())
    corpus = stdlib_corpus()
    cal_lines = list(corpus.calibration[:args.calib])
    eval_lines = list(corpus.held_out[:args.eval])
    assert not set(cal_lines) & set(eval_lines)
    eval_batches = tokenize_lines(eval_lines, loaded, batch_size=32, max_length=128, source="held-out")
    ref = embeddings(loaded, eval_batches)
    n_tokens = int(sum(b["attention_mask"].sum() for b in eval_batches))
    console.print(f"CPU: {describe()}")
    console.print(f"MiniLM loaded, corpus {len(corpus.calibration)}+{len(corpus.held_out)} sentences, "
                  f"{len(eval_lines)} eval sentences ({n_tokens} tokens) in {time.time() - t0:.1f}s")

    rows = []
    for name in [c for c in args.configs.split(",") if c]:
        variant_name, options, window = CONFIGS[name]
        variant = get_variant(variant_name)
        opts = transfer_options(variant, options, window)
        row: dict[str, Any] = {"config": name, "variant": variant_name, "options": opts}
        untrained = AttentionRewritePass(variant, options=opts, measure=False).run(loaded).model
        row["before"] = _stats(cosines(ref, embeddings(untrained, eval_batches)))
        if variant_name in ("linear", "mala"):
            plain_opts = {"window": window} if window else {}
            plain = AttentionRewritePass(variant, options=plain_opts, measure=False).run(loaded).model
            row["plain"] = _stats(cosines(ref, embeddings(plain, eval_batches)))
        t = time.time()
        _, _, params, rep = fit_params(loaded, attention=variant_name, options=options, hybrid_window=window,
                                       data=cal_lines, steps=steps, minutes=args.minutes, seed=args.seed,
                                       progress=args.verbose, batch_size=args.batch_size, max_samples=None)
        row["transfer_seconds"] = round(time.time() - t, 1)
        fitted = AttentionRewritePass(variant, options=opts, measure=False, params=params).run(loaded).model
        row["after"] = _stats(cosines(ref, embeddings(fitted, eval_batches)))
        row["steps_per_site"] = {k: v["steps"] for k, v in rep["sites"].items()}
        row["site_cosine"] = {k: [round(v["before"]["cosine"], 4), round(v["after"]["cosine"], 4)]
                              for k, v in rep["sites"].items()}
        row["calibration"] = rep["data"]
        rows.append(row)
        console.print(f"{name}: before {row['before']['mean']:.4f} after {row['after']['mean']:.4f} "
                      f"({row['transfer_seconds']}s)")

    table = Table(title=f"MiniLM sentence-embedding cosine vs original ({len(eval_lines)} held-out sentences)")
    for col in ("config", "plain swap", "untrained", "after transfer", "min after", "transfer s", "steps/site"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["config"], f"{r['plain']['mean']:.4f}" if "plain" in r else "-", f"{r['before']['mean']:.4f}",
                      f"{r['after']['mean']:.4f}", f"{r['after']['min']:.4f}", f"{r['transfer_seconds']:.0f}",
                      str(max(r["steps_per_site"].values())))
    console.print(table)
    result = {"model": str(minilm_path()), "eval_sentences": len(eval_lines), "eval_tokens": n_tokens,
              "calibration_sentences": len(cal_lines), "steps": steps, "minutes": args.minutes, "seed": args.seed,
              "batch_size": args.batch_size, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.platform(), "cpu": describe(), "rows": rows, "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
