"""The ``softswap transfer`` subcommand. ``rewrite/cli.py`` registers it by calling :func:`add_commands`.

    softswap transfer ORIGINAL -o OUT --binarize bivit [--data FILE.npz] [--steps N | --minutes M] [--seed S]
        [--option stage=w1a1,parts=attention+mlp,ratio=0.25] [--temperature T] [--checkpoint FILE] [--report r.json]
    softswap transfer ORIGINAL -o OUT --attention VARIANT [--hybrid-window 64] [--data FILE|offline|stdlib]
        [--steps N | --minutes M] [--stage2-steps N] [--stage2-rank R] [--stage2-lr LR] [--attention-ce W]
        [--seed S] [--layers ..] [--keep-softmax ..] [--option k=v ...]
        [--checkpoint FILE] [--report r.json] [--tokenizer DIR] [--batch-size B] [--max-samples N] [--lr LR] [--no-progress]

Prints a before/after fidelity table (rich). Softswap errors (:class:`rewrite.errors.SoftswapError`, e.g. a bad
data file or option) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from rewrite.cli import parse_options
from rewrite.errors import OptionError

log = logging.getLogger(__name__)
_PARSER: Any = None  # the transfer subparser (rebuilding a rank's command line for --nproc)


def print_report(report: dict[str, Any]) -> None:
    """Per-site and model-level before/after fidelity tables."""
    from rich.console import Console
    from rich.table import Table
    console = Console(highlight=False)
    table = Table(title=f"transfer {report['variant']} ({report['graph']}): site fidelity on held-out data "
                        f"({report['data']['source']})")
    for col in ("site", "steps", "params", "cosine before", "cosine after", "rel.err before", "rel.err after", "s"):
        table.add_column(col)
    for name, row in report["sites"].items():
        b, a = row["before"], row["after"]
        table.add_row(name, str(row["steps"]), str(row["n_params"]), f"{b['cosine']:.5f}", f"{a['cosine']:.5f}",
                      f"{b['rel_error']:.3e}", f"{a['rel_error']:.3e}", f"{row['seconds']:.1f}")
    console.print(table)
    for name, reason in report.get("skipped", {}).items():
        console.print(f"{name}: kept ({reason})")
    mf = report.get("model_fidelity")
    if mf:
        t2 = Table(title="model fidelity vs original (held-out batches)")
        for col in ("output", "cosine before", "cosine after", "rel.err before", "rel.err after"):
            t2.add_column(col)
        for out_name, after in mf["after"]["outputs"].items():
            before = mf["before"]["outputs"].get(out_name, {})
            t2.add_row(out_name, f"{before.get('cosine', float('nan')):.5f}", f"{after['cosine']:.5f}",
                       f"{before.get('rel_error', float('nan')):.3e}", f"{after['rel_error']:.3e}")
        console.print(t2)
    s2 = report.get("stage2")
    if s2 and s2.get("steps"):
        console.print(f"stage 2: rank {s2['rank']} updates of {len(s2['weights'])} weights, {s2['steps']} steps "
                      f"({s2['seconds']:.1f}s), loss {s2['loss_first']:.4g} -> {s2['loss_last']:.4g}; merged")
    for line in report.get("lines", []):
        console.print(line)
    if "output" in report:
        console.print(f"wrote {report['output']} ({report['seconds']:.1f}s)")


def _options(items: Any) -> dict[str, str]:
    """``--option`` items; an item may carry several ``k=v`` separated by commas (``stage=w1a1,ratio=0.3``)."""
    split = []
    for item in items or []:
        parts = item.split(",")
        if all("=" in p for p in parts):
            split.extend(parts)
        else:
            split.append(item)
    return parse_options(split)


def cmd_qat(args: argparse.Namespace) -> int:
    """``--binarize bivit``: BiViT quantization-aware training (:func:`passes.transfer.bivit.qat`)."""
    from .bivit import qat
    if args.binarize != "bivit":
        raise OptionError(f"--binarize {args.binarize!r}: known: bivit")
    for flag, value in (("--hybrid-window", args.hybrid_window), ("--layers", args.layers),
                        ("--keep-softmax", args.keep_softmax), ("--tokenizer", args.tokenizer),
                        ("--max-samples", args.max_samples),
                        ("--stage2-steps", args.stage2_steps), ("--attention-ce", args.attention_ce),
                        ("--nproc", args.nproc), ("--max-memory", args.max_memory)):
        if value:
            raise OptionError(f"{flag} is an attention-transfer option; --binarize bivit does not take it")
    _, report = qat(args.model, args.output, options=_options(args.option), data=args.data, steps=args.steps,
                    minutes=args.minutes, seed=args.seed, checkpoint=args.checkpoint,
                    progress=not args.no_progress, batch_size=args.batch_size if args.batch_size is not None else 64,
                    lr=args.lr if args.lr is not None else 1e-3, binary_lr=args.binary_lr,
                    temperature=args.temperature, report_path=args.report)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        from rich.console import Console
        console = Console(highlight=False)
        console.print(f"BiViT QAT of {report['model']} on {report['data']}: {report['steps']} steps "
                      f"({report['train_seconds']:.1f}s), options {report['options']}")
        for line in report["lines"]:
            console.print(f"  {line}")
        if "output" in report:
            console.print(f"wrote {report['output']} ({report['seconds']:.1f}s)")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    """Run :func:`passes.transfer.transfer` (or, with ``--binarize``, BiViT QAT) from parsed arguments; returns the
    exit status."""
    from .transfer import DEFAULT_MAX_SAMPLES, transfer
    if args.steps is not None and args.minutes is not None:
        raise OptionError("give --steps or --minutes, not both")
    if bool(args.attention) == bool(args.binarize):
        raise OptionError("give --attention VARIANT (attention transfer) or --binarize bivit (binarization QAT)")
    if args.binarize:
        return cmd_qat(args)
    if args.binary_lr is not None:
        raise OptionError("--binary-lr is a --binarize option")
    # --- distributed hook (.distributed): --nproc launches ranks via torch.distributed.run; a launched rank
    # (torchrun / SLURM environment) fits its share of the sites and only rank 0 writes and prints.
    from . import distributed
    from .capture_store import parse_size
    max_memory = parse_size(args.max_memory, "--max-memory") if args.max_memory is not None else None
    if args.nproc is not None and distributed.launched_env() is None:
        return distributed.launch(distributed.child_argv(args, _PARSER), args.nproc,
                                  verbose=bool(getattr(args, "verbose", False)))

    def run(shard: Any) -> tuple[dict[str, Any], bool]:
        _, rep = transfer(args.model, args.output, attention=args.attention, options=parse_options(args.option),
                          hybrid_window=args.hybrid_window, data=args.data, steps=args.steps, minutes=args.minutes,
                          seed=args.seed, layers=args.layers, keep_softmax=args.keep_softmax,
                          checkpoint=args.checkpoint, progress=not args.no_progress and (shard is None or shard.writes),
                          batch_size=args.batch_size if args.batch_size is not None else 16,
                          max_samples=args.max_samples if args.max_samples is not None else DEFAULT_MAX_SAMPLES,
                          lr=args.lr if args.lr is not None else 1e-2,
                          report_path=args.report,
                          tokenizer=args.tokenizer, stage2_steps=args.stage2_steps, stage2_rank=args.stage2_rank,
                          stage2_lr=args.stage2_lr, attention_ce=args.attention_ce or 0.0,
                          shard=shard, max_memory=max_memory)
        return rep, shard is None or shard.writes

    report, writes = distributed.main_rank(run, args.dist_backend)
    if not writes:
        return 0
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print_report(report)
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``transfer`` to an ``argparse`` subparsers object (``parser.add_subparsers()``)."""
    p = subparsers.add_parser("transfer", help="rewrite attention and fit the replacement to the original "
                                               "(layer-wise attention transfer)")
    p.add_argument("model", help="original model: .onnx, .pt2 or a Hugging Face model folder")
    p.add_argument("-o", "--output", required=True, help="output path (.onnx or .pt2)")
    p.add_argument("--attention", help="variant: linear, mala, sigmoid, softplus, ...")
    p.add_argument("--binarize", help="bivit: binarise (BiViT) and train with distillation from the original")
    p.add_argument("--binary-lr", type=float, default=None,
                   help="learning rate of the latent binary weights and scales (--binarize; default --lr / 10)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (--binarize)")
    p.add_argument("--hybrid-window", type=int, default=0, metavar="W",
                   help="sliding softmax window of W tokens (linear, mala); 0 = off")
    p.add_argument("--data", default=None, help=".npz (arrays by input name; with --binarize: rewrite/fit_data.py format, labels 'y' optional), a text file (one sample per line, "
                                                "tokenized with the model's tokenizer), 'offline' or 'stdlib'; default "
                                                "'offline' (docstrings + package prose) when a tokenizer exists, else synthetic (warned)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per site (default 1500)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for fitting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", help="only these attention sites (indices, ranges, attnN)")
    p.add_argument("--keep-softmax", help="keep these attention sites as softmax")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="variant option (repeatable)")
    p.add_argument("--checkpoint", help="checkpoint file (torch.save); resumed when it exists")
    p.add_argument("--report", help="write the report as JSON here")
    p.add_argument("--tokenizer", help="tokenizer folder for text --data (default: the model folder's tokenizer)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (64 with --binarize)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="cap on text lines read (default 1024 for attention transfer)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-2 (1e-3 with --binarize)")
    p.add_argument("--stage2-steps", type=int, default=None, metavar="N",
                   help="LoLCATs stage 2: N steps of low-rank (LoRA) training of the attention projections against "
                        "the original's output, merged into the weights; default 600 for FX programs / Hugging Face "
                        "folders with BERT-named projections, else off; 0 = off")
    p.add_argument("--stage2-rank", type=int, default=8, metavar="R", help="rank of the stage-2 updates (default 8)")
    p.add_argument("--stage2-lr", type=float, default=1e-3, help="stage-2 Adam learning rate (default 1e-3)")
    p.add_argument("--attention-ce", type=float, default=None, metavar="W",
                   help="weight of the attention-map cross-entropy term in the per-site fit (LoLCATs λ_ce, beside "
                        "1000 x output MSE); default 0 = off")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="fit on N local ranks (torch.distributed.run; sites split by parameter count); under your "
                        "own torchrun/SLURM launch leave it out: RANK/WORLD_SIZE are read from the environment")
    p.add_argument("--dist-backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="torch.distributed backend of a distributed run (auto = gloo; nccl on GPU hosts)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="RAM for captured activations (bytes, or 512M / 4G / 2GiB); beyond it they stream to a "
                        "temporary folder beside the output and are read back per mini-batch")
    p.set_defaults(func=cmd_transfer)
    global _PARSER
    _PARSER = p


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m passes.transfer.cli transfer ...``): the ``softswap`` command itself."""
    from rewrite.cli import main as softswap_main
    return softswap_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
