"""The ``softswap`` command: one subcommand per arrow of the data flow (DESIGN.md).

Errors softswap raises on purpose (:class:`~rewrite.errors.SoftswapError`) print one line naming the culprit and
exit with status 2; nothing is written in that case. Anything else that escapes (a bug) prints one line and exits
with status 1; Ctrl-C exits with status 130. ``--debug`` adds the traceback. Warnings logged by a command that then
fails are dropped (the error line is the whole story); ``-v`` shows everything as it happens.
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

from .errors import OptionError, SoftswapError, first_line

log = logging.getLogger("softswap")
console = Console(highlight=False)


def parse_options(items: Sequence[str] | None) -> dict[str, str]:
    """``--option key=value`` items as a dict; :class:`OptionError` names a malformed, empty or repeated item.
    Values are checked against the variant's declared types and ranges when the pass is built."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise OptionError(f"--option {item!r}: expected key=value")
        key, value = item.split("=", 1)
        key, value = key.strip(), value.strip()
        if not value:
            raise OptionError(f"--option {item!r}: option {key} has an empty value")
        if key in out:
            raise OptionError(f"--option {key} given twice ({key}={out[key]} and {key}={value})")
        out[key] = value
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
    if report.get("feature_taps"):
        console.print("feature taps (--ood --layers): " + ", ".join(
            f"{t['name']}={t['node']} {t['role']} {t['pool']} D={t['features']}" for t in report["feature_taps"]))
    if report["unmatched"]:
        console.print(f"{len(report['unmatched'])} softmax node(s) not absorbed by a site"
                      + ("" if explain else " (--explain shows why)"))
        if explain:
            for u in report["unmatched"]:
                console.print(f"  {u['softmax']}: at {u['node']} ({u['op']}) expected {u['expected']}; "
                              f"found {u['found']}")
    for s in report.get("nms_sites", []):
        params = ", ".join(f"{k}={s[k]:.6g}" if isinstance(s[k], float) else f"{k}={s[k]}" for k in ("max_output_boxes_per_class", "iou_threshold", "score_threshold")
                           if k in s)
        console.print(f"NMS site {s['name']}: {s['node']} ({s['spelling']}, boxes {s['box_layout']}"
                      + (f", {params}" if params else "") + f") → {s['output']}")
    for u in report.get("nms_unmatched", []):
        console.print(f"NMS node {u['nms']} not rewritable: expected {u['expected']}; found {u['found']}")
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
            table.add_row(s["name"], s.get("mask", "-"), s["status"],
                          f"{fid['cosine']:.6f}" if fid else "-", f"{fid['rel_error']:.2e}" if fid else "-",
                          s.get("reason", ""))
        console.print(table)
        for line in p.get("lines", []):  # a family pass's own summary (e.g. held-out accuracy of a fitted head)
            console.print(f"  {line}")
    if "fidelity" in report:
        print_verify(report["fidelity"], "model fidelity (original vs rewritten)")
        if report["fidelity"].get("added_outputs"):
            console.print("outputs added by the passes (no reference to compare): "
                          + ", ".join(report["fidelity"]["added_outputs"]))
        if report["fidelity"].get("changed_outputs"):
            console.print("outputs changed on purpose by the passes (not compared): "
                          + ", ".join(report["fidelity"]["changed_outputs"]))
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
    if args.params and not args.decode:
        raise OptionError("--params is read by --decode (per-site parameters of a transfer checkpoint)")
    options: dict[str, str] = parse_options(args.option)
    if args.hybrid_window is not None:  # the sliding-window hybrid: the variant option ``window``
        if "window" in options:
            raise OptionError(f"--hybrid-window {args.hybrid_window} and --option window={options['window']}: "
                              "give one")
        options["window"] = str(args.hybrid_window)
    _, report = convert(args.model, args.output, attention=args.attention, passes=passes,
                        options=options, layers=args.layers, keep_softmax=args.keep_softmax,
                        verify=not args.no_verify, report_path=args.report, dump_dir=args.dump_ir,
                        head=args.head, soft_nms=args.soft_nms, ood=args.ood, binarize=args.binarize, fit=args.fit,
                        decode=args.decode, params=args.params)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print_convert(report)
        if "decode" in report:
            d = report["decode"]
            console.print(f"decode graphs ({d['family']}, {d['layers']} layers): state per layer "
                          + ", ".join(f"{s['name'].split('.')[-1]} {tuple(s['shape'])}" for s in d["state"][:2]))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .api import verify
    data = verify(args.original, args.rewritten).to_dict()
    if args.json:
        print(json.dumps(data, indent=1, default=str))
    else:
        print_verify(data)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with softswap's error format: one line naming the argument, exit status 2 (``--help`` shows the
    usage)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"softswap: error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="softswap", description="Find the softmax in a model and rewrite it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="load pickled objects in .pt2 archives without checking them: runs code from the file; "
                             "only for files whose author you trust (docs/security.md)")
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
    p.add_argument("--head", help="replace the softmax classifier head: svm, zloss or fourier (with --fit DATA)")
    p.add_argument("--soft-nms", help="replace NonMaxSuppression with Soft-NMS: linear, gaussian or hard")
    p.add_argument("--ood", help="add an out-of-distribution score output: mahalanobis (with --fit DATA)")
    p.add_argument("--binarize", help="binarize the model: bivit")
    p.add_argument("--fit", metavar="DATA", help=".npz with the model inputs keyed by input name ('x' for one "
                                                 "input), integer labels 'y' and optional 'x_ood'")
    p.add_argument("--passes", help="comma-separated pass names (see `softswap passes`)")
    p.add_argument("--layers", help="only these attention sites (indices, ranges, or attnN names); with --ood: "
                                    "the feature layers to score")
    p.add_argument("--keep-softmax", help="keep these attention sites as softmax")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="variant option (repeatable)")
    p.add_argument("--hybrid-window", type=int, metavar="W", help="linear/mala: exact softmax over the last W keys, "
                                                                   "the variant over the older ones (= --option "
                                                                   "window=W)")
    p.add_argument("--report", help="write the report as JSON here")
    p.add_argument("--dump-ir", help="dump the graph after each pass into this folder")
    p.add_argument("--no-verify", action="store_true", help="skip the fidelity check")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--decode", action="store_true", help="causal LMs: write OUTPUT as a folder with prefill.onnx, "
                                                          "step.onnx (recurrent state as named inputs/outputs) and "
                                                          "decode.json")
    p.add_argument("--params", metavar="CKPT", help="with --decode: per-site parameters from a `softswap transfer "
                                                    "--checkpoint` file")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="compare two models on the same inputs (any graph kinds)")
    p.add_argument("original")
    p.add_argument("rewritten")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    _add_plugin_commands(sub)
    for command in sub.choices.values():  # the global flags are accepted after the subcommand too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("--trust-remote-code", action="store_true", default=argparse.SUPPRESS,
                             help="see `softswap --help`")
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_plugin_commands(sub: Any) -> None:
    """Subcommands of the plugins (``softswap.commands`` entry points: ``add_commands(subparsers)``)."""
    from .plugins import COMMAND_GROUP, entry_points, load
    for ep in entry_points(COMMAND_GROUP):
        add = load(ep)
        if add is not None:
            add(sub)


def one_line(message: str, limit: int = 600) -> str:
    """``message`` on one line: its first non-empty line, plus a trailing ``[culprit: ...]`` from a later line;
    cut to ``limit`` characters (the culprit kept)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    text = lines[0]
    culprit = next((line[line.rindex("[culprit:"):] for line in reversed(lines) if "[culprit:" in line), "")
    if culprit and culprit not in text:
        text = f"{text} … {culprit}"
    if len(text) > limit:
        tail = culprit if culprit and text.endswith(culprit) else ""
        text = text[:limit - len(tail) - 2] + "… " + tail
    return text


class _DeferredWarnings(logging.Handler):
    """Holds log records until the command's outcome is known: replayed on success, dropped on error."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self, target: logging.Handler) -> None:
        for record in self.records:
            if record.levelno >= target.level:
                target.handle(record)
        self.records.clear()


def _install_sigint_flag() -> Any:
    """Ctrl-C still raises KeyboardInterrupt, and :func:`rewrite.interrupts.interrupted` remembers it (so a
    dependency that converts the interrupt into another exception cannot make a retry swallow it)."""
    import signal
    import threading

    from .interrupts import note_sigint
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        note_sigint()
        raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, handler)


def _debug_dump(deferred: "_DeferredWarnings | None", stream: logging.Handler) -> None:
    """``--debug`` on an error: the warnings held back, then the traceback."""
    import traceback
    if deferred is not None:
        deferred.replay(stream)
    traceback.print_exc()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a command-line error already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    deferred: _DeferredWarnings | None = None
    if args.verbose:
        root.addHandler(stream)
        root.setLevel(logging.INFO)
    else:
        deferred = _DeferredWarnings()
        root.addHandler(deferred)
        root.setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.verbose:  # dependency chatter (exporter banners, deprecation notes) is not the user's business
        import warnings
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for noisy in ("torch", "torch.onnx", "torch._export", "torch.export", "onnxscript", "onnx_ir"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    from .interrupts import reset_sigint
    from .safe_load import trusting_remote_code
    reset_sigint()
    previous_sigint = _install_sigint_flag()
    status = 1
    try:
        with trusting_remote_code(bool(getattr(args, "trust_remote_code", False))):
            status = args.func(args)
        if deferred is not None:
            deferred.replay(stream)
        return status
    except SoftswapError as exc:
        if debug:
            _debug_dump(deferred, stream)
        print(f"softswap: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            _debug_dump(deferred, stream)
        print("softswap: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug or an unmapped dependency failure: one line, not a traceback
        if debug:
            _debug_dump(deferred, stream)
        print(f"softswap: error: {one_line(first_line(exc))} (unexpected; rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        root.removeHandler(deferred if deferred is not None else stream)
        root.setLevel(previous_level)
        if previous_sigint is not None:
            import signal
            signal.signal(signal.SIGINT, previous_sigint)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
