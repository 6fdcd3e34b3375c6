"""Sentence-embedding fidelity of attention replacements on the real all-MiniLM-L6-v2, before and after transfer.

For each configuration (variant + options) this measures, on held-out sentences never used for calibration:

- ``before``: the untrained swap (the transfer configuration with its initial parameters — identity Hedgehog maps,
  b = −ln n_ref, τ = 1, γ = 0.1);
- ``plain``: for linear / MALA, the parameter-free default swap (φ = elu+1), for reference;
- ``after``: the swap with parameters fitted by :func:`passes.transfer.fit_params` on calibration sentences;

as the mean (and minimum) cosine between the original and converted sentence embeddings — mean pooling of
``last_hidden_state`` over the tokens with ``attention_mask`` = 1, as sentence-transformers does.

Calibration is what ``softswap transfer`` does by default (``data=None``): for MiniLM, whose folder ships a
tokenizer, the calibration split of the offline corpus (:func:`passes.transfer.corpus.offline_corpus`:
standard-library docstrings and installed packages' README/licence prose, interleaved), first ``--calib``
sentences; then the default stage 2 (``--stage2-steps``, default ``DEFAULT_STAGE2_STEPS``; 0 = off). Two evaluation
sets, side by side:

- **in-domain**: the held-out split of the same offline corpus (disjoint by hash);
- **out-of-domain**: the operating system's package documentation under /usr/share/doc (copyright, README, NEWS,
  changelog files; :func:`system_docs_corpus`), a source the calibration never saw (no sentence shared with the
  offline corpus). Where /usr/share/doc is missing, the bench stops and says so.

Usage::

    .venv/bin/python tools/bench/fidelity.py [--steps N | --minutes M] [--calib 512] [--eval 256]
        [--configs linear,mala,...] [--plain] [--out tools/bench/results/fidelity.json]

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
from passes.transfer import fit_params, transfer_options  # noqa: E402
from passes.transfer.transfer import DEFAULT_MAX_SAMPLES, DEFAULT_STEPS  # noqa: E402
from passes.transfer.corpus import offline_corpus, system_docs_corpus  # noqa: E402
from passes.transfer.stage2 import DEFAULT_STAGE2_STEPS  # noqa: E402
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
    budget.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per site (default {DEFAULT_STEPS}, as the transfer default)")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock fitting budget per configuration")
    parser.add_argument("--calib", type=int, default=DEFAULT_MAX_SAMPLES,
                        help=f"calibration sentences (default {DEFAULT_MAX_SAMPLES}, as the transfer default)")
    parser.add_argument("--eval", type=int, default=256, help="held-out evaluation sentences per set (default 256)")
    parser.add_argument("--stage2-steps", type=int, default=DEFAULT_STAGE2_STEPS,
                        help=f"LoRA stage 2 steps after stage 1 (default {DEFAULT_STAGE2_STEPS}, as the transfer "
                             "default; 0: off)")
    parser.add_argument("--stage2-rank", type=int, default=8)
    parser.add_argument("--stage2-lr", type=float, default=1e-3)
    parser.add_argument("--plain", action="store_true", help="also measure the parameter-free linear/mala swap")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list from {list(CONFIGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "tools/bench/results/fidelity.json"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    steps = args.steps if args.steps is not None or args.minutes is not None else DEFAULT_STEPS

    from rich.console import Console
    from rich.table import Table
    console = Console(highlight=False)

    t0 = time.time()
    loaded = load_model(minilm_path())
    corpus = offline_corpus()
    ood = system_docs_corpus()
    if not ood.held_out:
        raise SystemExit(f"no out-of-domain text: {ood.source} is empty (needs /usr/share/doc)")
    cal_lines = list(corpus.calibration[:args.calib])
    sets = {"in": list(corpus.held_out[:args.eval]), "ood": list(ood.held_out[:args.eval])}
    assert not set(cal_lines) & (set(sets["in"]) | set(sets["ood"]))
    eval_batches = {k: tokenize_lines(v, loaded, batch_size=32, max_length=128, source=k) for k, v in sets.items()}
    ref = {k: embeddings(loaded, v) for k, v in eval_batches.items()}
    n_tokens = {k: int(sum(b["attention_mask"].sum() for b in v)) for k, v in eval_batches.items()}

    def stats(model: Any) -> dict[str, dict[str, float]]:
        return {k: _stats(cosines(ref[k], embeddings(model, eval_batches[k]))) for k in sets}

    console.print(f"CPU: {describe()}")
    console.print(f"MiniLM loaded; in-domain: {len(sets['in'])} held-out sentences of {corpus.source} "
                  f"({n_tokens['in']} tokens); out-of-domain: {len(sets['ood'])} sentences of {ood.source} "
                  f"({n_tokens['ood']} tokens); {time.time() - t0:.1f}s")

    rows = []
    for name in [c for c in args.configs.split(",") if c]:
        variant_name, options, window = CONFIGS[name]
        variant = get_variant(variant_name)
        opts = transfer_options(variant, options, window)
        row: dict[str, Any] = {"config": name, "variant": variant_name, "options": opts}
        untrained = AttentionRewritePass(variant, options=opts, measure=False).run(loaded).model
        row["before"] = stats(untrained)
        if args.plain and variant_name in ("linear", "mala"):
            plain_opts = {"window": window} if window else {}
            plain = AttentionRewritePass(variant, options=plain_opts, measure=False).run(loaded).model
            row["plain"] = stats(plain)
        t = time.time()
        _, calib, params, rep = fit_params(loaded, attention=variant_name, options=options, hybrid_window=window,
                                       data=None, steps=steps, minutes=args.minutes, seed=args.seed,
                                       progress=args.verbose, batch_size=args.batch_size, max_samples=args.calib)
        assert rep["data"]["source"].startswith("default real text"), rep["data"]
        row["transfer_seconds"] = round(time.time() - t, 1)
        fitted = AttentionRewritePass(variant, options=opts, measure=False, params=params).run(loaded).model
        row["after"] = stats(fitted)
        if args.stage2_steps and variant_name in ("linear", "mala"):
            from passes.transfer.stage2 import lora_stage2
            torch.set_num_threads(1)  # as the transfer default (threads=1) does
            row["stage2"] = lora_stage2(fitted, loaded, calib.train, rank=args.stage2_rank, steps=args.stage2_steps,
                                        lr=args.stage2_lr, seed=args.seed)
            row["after_stage2"] = stats(fitted)
            console.print(f"{name}+stage2: in {row['after_stage2']['in']['mean']:.4f} / ood "
                          f"{row['after_stage2']['ood']['mean']:.4f} (worst {row['after_stage2']['ood']['min']:.4f}; "
                          f"{row['stage2']['seconds']}s)")
        row["steps_per_site"] = {k: v["steps"] for k, v in rep["sites"].items()}
        row["site_cosine"] = {k: [round(v["before"]["cosine"], 4), round(v["after"]["cosine"], 4)]
                              for k, v in rep["sites"].items()}
        row["calibration"] = rep["data"]
        rows.append(row)
        console.print(f"{name}: after in-domain {row['after']['in']['mean']:.4f} / out-of-domain "
                      f"{row['after']['ood']['mean']:.4f} ({row['transfer_seconds']}s)")

    table = Table(title="MiniLM sentence-embedding cosine vs original: in-domain (offline corpus held out) | "
                        "out-of-domain (/usr/share/doc prose)")
    for col in ("config", "plain in|ood", "untrained in|ood", "stage 1 in (mean/min)", "stage 1 ood (mean/min)",
                "+ stage 2 in (mean/min)", "+ stage 2 ood (mean/min)", "transfer s", "steps/site"):
        table.add_column(col)
    for r in rows:
        plain = f"{r['plain']['in']['mean']:.4f} | {r['plain']['ood']['mean']:.4f}" if "plain" in r else "-"
        table.add_row(r["config"], plain, f"{r['before']['in']['mean']:.4f} | {r['before']['ood']['mean']:.4f}",
                      f"{r['after']['in']['mean']:.4f} / {r['after']['in']['min']:.4f}",
                      f"{r['after']['ood']['mean']:.4f} / {r['after']['ood']['min']:.4f}",
                      *([f"{r['after_stage2'][k]['mean']:.4f} / {r['after_stage2'][k]['min']:.4f}" for k in ("in", "ood")]
                        if "after_stage2" in r else ["-", "-"]),
                      f"{r['transfer_seconds'] + r.get('stage2', {}).get('seconds', 0):.0f}",
                      str(max(r["steps_per_site"].values())))
    console.print(table)
    result = {"model": str(minilm_path()), "eval_sentences": {k: len(v) for k, v in sets.items()},
              "eval_sources": {"in": f"held-out split of {corpus.source}", "ood": ood.source},
              "eval_tokens": n_tokens,
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
