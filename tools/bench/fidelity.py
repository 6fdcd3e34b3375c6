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
sentences; then the default stage 2 (``--stage2-steps``, default ``DEFAULT_STAGE2_STEPS``; 0 = off) over the
transfer's default stage-2 text (:func:`passes.transfer.data.stage2_batches`: the train split plus the next
``STAGE2_EXTRA_LINES`` corpus lines, none of them in any evaluation set — asserted). Two evaluation
sets, side by side:

- **in-domain**: the held-out split of the same offline corpus (disjoint by hash);
- **out-of-domain** (``--ood``, each a source the calibration never saw, no sentence shared with it):
  ``doc`` — the operating system's package documentation under /usr/share/doc (copyright, README, NEWS,
  changelog files; :func:`system_docs_corpus`: legal text and terse change notes); ``man`` — held-out sentences
  of the manual pages (:func:`man_pages_corpus`: imperative reference English); ``manuals`` — book-like prose
  of the GNU info manuals and Perl's pod documentation (:func:`manuals_corpus`). Where a source is missing on the
  machine it is left out of the table (said so); with none at all the bench stops.

Every set is reported as mean / worst sentence, and per token-length band (the worst sentences are long ones).

Usage::

    .venv/bin/python tools/bench/fidelity.py [--steps N | --minutes M] [--calib 512] [--eval 256]
        [--configs linear,mala,...] [--ood doc,man,manuals] [--plain] [--out tools/bench/results/fidelity.json]

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
from passes.transfer.corpus import (man_pages_corpus, manuals_corpus, offline_corpus,  # noqa: E402
                                    system_docs_corpus)
from passes.transfer.stage2 import DEFAULT_STAGE2_STEPS  # noqa: E402
from passes.transfer.data import STAGE2_EXTRA_LINES, stage2_batches, tokenize_lines  # noqa: E402
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


#: Token-length bands (inclusive of [CLS]/[SEP]) reported per set.
BANDS = ((0, 20), (20, 35), (35, 1000))
#: Out-of-domain sources by ``--ood`` name (evaluation only; none of them ever calibrates).
OOD_SOURCES = {"doc": system_docs_corpus, "man": man_pages_corpus, "manuals": manuals_corpus}


def _stats(c: np.ndarray, lengths: np.ndarray | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"mean": float(c.mean()), "min": float(c.min()), "p10": float(np.percentile(c, 10))}
    if lengths is not None:
        out["bands"] = {f"{lo}-{hi}": {"n": int(m.sum()), "mean": float(c[m].mean()), "min": float(c[m].min())}
                        for lo, hi in BANDS for m in [(lengths >= lo) & (lengths < hi)] if m.any()}
        out["worst"] = int(np.argmin(c))
    return out


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
    parser.add_argument("--ood", default="doc,man,manuals", help=f"out-of-domain sets from {list(OOD_SOURCES)}")
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
    cal_lines = list(corpus.calibration[:args.calib + STAGE2_EXTRA_LINES])  # stage 1 + the default stage-2 text
    sets = {"in": list(corpus.held_out[:args.eval])}
    sources = {"in": f"held-out split of {corpus.source}"}
    for name in [n for n in args.ood.split(",") if n]:
        src = OOD_SOURCES[name]()
        if not src.held_out:
            console.print(f"out-of-domain set {name!r} left out: {src.source} is empty on this machine")
            continue
        sets[name], sources[name] = list(src.held_out[:args.eval]), src.source
    if len(sets) < 2:
        raise SystemExit("no out-of-domain text on this machine (needs /usr/share/doc or /usr/share/info)")
    assert not set(cal_lines) & set().union(*map(set, sets.values())), "an evaluation sentence calibrates"
    eval_batches = {k: tokenize_lines(v, loaded, batch_size=32, max_length=128, source=k, sort_by_length=False)
                    for k, v in sets.items()}
    lengths = {k: np.concatenate([b["attention_mask"].sum(1) for b in v]) for k, v in eval_batches.items()}
    ref = {k: embeddings(loaded, v) for k, v in eval_batches.items()}
    n_tokens = {k: int(v.sum()) for k, v in lengths.items()}

    def stats(model: Any) -> dict[str, dict[str, Any]]:
        return {k: _stats(cosines(ref[k], embeddings(model, eval_batches[k])), lengths[k]) for k in sets}

    console.print(f"CPU: {describe()}")
    for k in sets:
        console.print(f"set {k}: {len(sets[k])} sentences of {sources[k]} ({n_tokens[k]} tokens)")
    console.print(f"MiniLM loaded, sets built; {time.time() - t0:.1f}s")

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
            s2_train = stage2_batches(loaded, None, calib, max_samples=args.calib)  # as the transfer default
            row["stage2"] = lora_stage2(fitted, loaded, s2_train, rank=args.stage2_rank, steps=args.stage2_steps,
                                        lr=args.stage2_lr, seed=args.seed)
            row["stage2"]["train_batches"] = len(s2_train)
            row["after_stage2"] = stats(fitted)
            console.print(f"{name}+stage2: " + ", ".join(f"{k} {v['mean']:.4f} (worst {v['min']:.4f})"
                                                       for k, v in row["after_stage2"].items())
                          + f"; {row['stage2']['seconds']}s")
        row["steps_per_site"] = {k: v["steps"] for k, v in rep["sites"].items()}
        row["site_cosine"] = {k: [round(v["before"]["cosine"], 4), round(v["after"]["cosine"], 4)]
                              for k, v in rep["sites"].items()}
        row["calibration"] = rep["data"]
        rows.append(row)
        console.print(f"{name} stage 1: " + ", ".join(f"{k} {v['mean']:.4f} (worst {v['min']:.4f})"
                                                     for k, v in row["after"].items())
                      + f"; {row['transfer_seconds']}s")

    table = Table(title="MiniLM sentence-embedding cosine vs original, mean / worst sentence: in-domain (offline "
                        "corpus held out) | out-of-domain (" + ", ".join(k for k in sets if k != "in") + ")")
    for col in ("config", "stage", *sets, "transfer s", "steps/site"):
        table.add_column(col)
    for r in rows:
        if "plain" in r:
            table.add_row(r["config"], "plain swap", *[f"{r['plain'][k]['mean']:.4f}" for k in sets], "-", "-")
        table.add_row(r["config"], "untrained", *[f"{r['before'][k]['mean']:.4f}" for k in sets], "-", "-")
        table.add_row(r["config"], "stage 1", *[f"{r['after'][k]['mean']:.4f} / {r['after'][k]['min']:.3f}"
                                                for k in sets],
                      f"{r['transfer_seconds']:.0f}", str(max(r["steps_per_site"].values())))
        if "after_stage2" in r:
            table.add_row(r["config"], "+ stage 2", *[f"{r['after_stage2'][k]['mean']:.4f} / "
                                                      f"{r['after_stage2'][k]['min']:.3f}" for k in sets],
                          f"{r['transfer_seconds'] + r['stage2']['seconds']:.0f}", str(r["stage2"]["steps"]))
    by_len = Table(title="final stage, mean / worst sentence by token count (with [CLS]/[SEP]; n sentences)")
    for col in ("config", "set", *(f"{lo}-{hi - 1} tok" if hi < 1000 else f">= {lo} tok" for lo, hi in BANDS)):
        by_len.add_column(col)
    for r in rows:
        final = r.get("after_stage2", r["after"])
        for k in sets:
            cells = [final[k]["bands"].get(f"{lo}-{hi}") for lo, hi in BANDS]
            by_len.add_row(r["config"], k, *[f"{c['mean']:.4f} / {c['min']:.3f} ({c['n']})" if c else "-"
                                            for c in cells])
    console.print(table)
    console.print(by_len)
    result = {"model": str(minilm_path()), "eval_sentences": {k: len(v) for k, v in sets.items()},
              "eval_sources": sources, "eval_texts": sets,
              "eval_tokens": n_tokens,
              "calibration_sentences": args.calib, "stage2_extra_lines": STAGE2_EXTRA_LINES, "steps": steps,
              "minutes": args.minutes, "seed": args.seed,
              "batch_size": args.batch_size, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.platform(), "cpu": describe(), "rows": rows, "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
