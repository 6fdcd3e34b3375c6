"""The ``softswap`` command: one subcommand per arrow of the data flow (DESIGN.md).

Errors softswap raises on purpose (:class:`~rewrite.errors.SoftswapError`) print one line naming the culprit and
exit with status 2; nothing is written in that case.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from .errors import OptionError, SoftswapError

log = logging.getLogger("softswap")
console = Console(highlight=False)


def parse_options(items: Sequence[str] | None) -> dict[str, str]:
    """``--option key=value`` items as a dict; :class:`OptionError` names a malformed item."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise OptionError(f"--option {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _site_table(sites: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("site", "spelling", "heads", "kv", "head_dim", "scale", "causal", "mask", "layout"):
        table.add_column(col)
    for s in sites:
        table.add_row(s["name"], s["spelling"], str(s["heads"]), str(s["kv_heads"]), str(s["head_dim"]),
                      f"{s['scale']:.6g}", str(s["causal"]), s["mask"], s["layout"])
    return table


def print_inspect(report: dict[str, Any], explain: bool) -> None:
    console.print(f"[bold]{report['model']}[/bold] ({report['graph']} graph, {report['nodes']} nodes, "
                  f"{report['softmax_nodes']} softmax)")
    if report["attention_sites"]:
        console.print(_site_table(report["attention_sites"], f"{len(report['attention_sites'])} attention sites"))
    else:
        console.print("no attention found in this model")
    for h in report["heads"]:
        console.print(f"classifier head {h['name']}: {h['node']} {h['in_features']} → {h['num_classes']} "
                      f"classes ({h['activation']}) → output {h['output']}")
    if report["unmatched"]:
        console.print(f"{len(report['unmatched'])} softmax node(s) not absorbed by a site"
                      + ("" if explain else " (--explain shows why)"))
        if explain:
            for u in report["unmatched"]:
                console.print(f"  {u['softmax']}: at {u['node']} ({u['op']}) expected {u['expected']}; "
                              f"found {u['found']}")
    if report["unknown_ops"]:
        console.print("custom ops (not understood, left alone): " +
                      ", ".join(f"{k}×{v}" for k, v in report["unknown_ops"].items()))


def print_convert(report: dict[str, Any]) -> None:
    for p in report["passes"]:
        table = Table(title=f"{p['name']}: {p.get('replaced', 0)} of {p.get('found', 0)} sites replaced "
                            f"({p['seconds']:.1f}s)")
        for col in ("site", "mask", "status", "site cosine", "site rel.err", "reason"):
            table.add_column(col)
        for s in p.get("sites", []):
            fid = s.get("fidelity") or {}
            table.add_row(s["name"], s["mask"], s["status"],
                          f"{fid['cosine']:.6f}" if fid else "-", f"{fid['rel_error']:.2e}" if fid else "-",
                          s.get("reason", ""))
        console.print(table)
    if "fidelity" in report:
        print_verify(report["fidelity"], "model fidelity (original vs rewritten)")
    if "output" in report:
        console.print(f"wrote {report['output']}")


def print_verify(data: dict[str, Any], title: str = "verify") -> None:
    table = Table(title=title)
    for col in ("output", "shape", "max abs", "max rel", "rel.err", "cosine", "top-1"):
        table.add_column(col)
    for o in data["outputs"]:
        table.add_row(o["name"], str(tuple(o["shape"])), f"{o['max_abs']:.3e}", f"{o['max_rel']:.3e}",
                      f"{o['rel_error']:.3e}", f"{o['cosine']:.6f}",
                      "-" if o["top1"] is None else f"{o['top1']:.3f}")
    console.print(table)


# ------------------------------------------------------------------------------------------------------------
def print_spellings(graph_kind: str | None, as_json: bool) -> None:
    """Every accepted spelling, per recognition step, with the graph ops of each canonical kind."""
    from .recognize import spellings
    tables = spellings(graph_kind)
    if as_json:
        print(json.dumps(tables, indent=1))
        return
    kinds = ("fx", "onnx") if graph_kind is None else (graph_kind,)
    for title, rows in tables.items():
        table = Table(title=title)
        for col in ("tag", "kinds", "accepts", *(f"{k} ops" for k in kinds)):
            table.add_column(col)
        for row in rows:
            table.add_row(row["tag"], ", ".join(row["kinds"]), row["accepts"],
                          *(", ".join(row[k]) or "-" for k in kinds))
        console.print(table)


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.spellings:
        print_spellings(args.graph, args.json)
        return 0
    if args.model is None:
        raise OptionError("inspect: give a model (or --spellings)")
    from .api import inspect
    report = inspect(args.model).to_dict()
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print_inspect(report, args.explain)
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from .passes import list_passes
    passes = list_passes()
    if args.json:
        print(json.dumps(passes, indent=1, default=str))
        return 0
    table = Table(title="registered passes")
    table.add_column("pass")
    table.add_column("description")
    table.add_column("options (default)")
    for name, info in passes.items():
        table.add_row(name, info["description"],
                      ", ".join(f"{k}={v['default']}" for k, v in info["options"].items()))
    console.print(table)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .api import convert
    passes = [p for p in (args.passes or "").split(",") if p]
    _, report = convert(args.model, args.output, attention=args.attention, passes=passes,
                        options=parse_options(args.option), layers=args.layers, keep_softmax=args.keep_softmax,
                        verify=not args.no_verify, report_path=args.report, dump_dir=args.dump_ir)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print_convert(report)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .api import verify
    data = verify(args.original, args.rewritten).to_dict()
    if args.json:
        print(json.dumps(data, indent=1, default=str))
    else:
        print_verify(data)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softswap", description="Find the softmax in a model and rewrite it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list attention sites, classifier heads and unmatched softmax nodes")
    p.add_argument("model", nargs="?", help=".onnx, .pt2 or a Hugging Face model folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--explain", action="store_true", help="say why each unmatched softmax does not qualify")
    p.add_argument("--spellings", action="store_true", help="list the accepted spellings (no model needed)")
    p.add_argument("--graph", choices=("fx", "onnx"), help="with --spellings: only this graph kind's ops")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list registered passes and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("convert", help="rewrite a model and write it (.onnx or .pt2)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output path (.onnx or .pt2)")
    p.add_argument("--attention", help="attention variant (reference, linear, mala, sigmoid, softplus, soft)")
    p.add_argument("--passes", help="comma-separated pass names (see `softswap passes`)")
    p.add_argument("--layers", help="only these attention sites (indices, ranges, or attnN names)")
    p.add_argument("--keep-softmax", help="keep these attention sites as softmax")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="variant option (repeatable)")
    p.add_argument("--report", help="write the report as JSON here")
    p.add_argument("--dump-ir", help="dump the graph after each pass into this folder")
    p.add_argument("--no-verify", action="store_true", help="skip the fidelity check")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="compare two models on the same inputs (any graph kinds)")
    p.add_argument("original")
    p.add_argument("rewritten")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: Any) -> None:
    """Subcommands of the plugins (``softswap.commands`` entry points: ``add_commands(subparsers)``)."""
    from .plugins import COMMAND_GROUP, entry_points, load
    for ep in entry_points(COMMAND_GROUP):
        add = load(ep)
        if add is not None:
            add(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.verbose:  # dependency chatter (exporter banners, deprecation notes) is not the user's business
        import warnings
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for noisy in ("torch", "torch.onnx", "torch._export", "torch.export", "onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except SoftswapError as exc:
        print(f"softswap: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
