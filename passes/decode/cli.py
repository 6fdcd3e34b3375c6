"""``softswap generate FOLDER --prompt-ids 5,17,42 --max-new-tokens N [--json]`` (or ``--prompt TEXT`` when the
folder has tokenizer files): greedy generation with the prefill + step graphs in onnxruntime.

:func:`add_commands` is this package's ``softswap.commands`` entry point (pyproject.toml)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .generate import DecodeSession, GenerateError, generate


def _prompt_ids(args: argparse.Namespace, folder: Path, manifest: dict) -> tuple[list[int], object | None]:
    """The prompt ids (from --prompt-ids or by tokenizing --prompt) and the tokenizer (None without one)."""
    if (args.prompt_ids is None) == (args.prompt is None):
        raise GenerateError("generate: give exactly one of --prompt-ids 5,17,42 or --prompt TEXT")
    tok = None
    if manifest.get("tokenizer"):
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises many kinds
            if args.prompt is not None:
                raise GenerateError(f"{folder}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    if args.prompt is not None:
        if tok is None:
            raise GenerateError(f"{folder}: --prompt needs tokenizer files in the folder; give --prompt-ids instead")
        return [int(t) for t in tok(args.prompt)["input_ids"]], tok
    items = [t.strip() for t in args.prompt_ids.split(",")]
    try:
        ids = [int(t) for t in items]
    except ValueError:
        raise GenerateError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
    return ids, tok


def run_generate(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if args.threads < 0:
        raise GenerateError(f"--threads must be >= 0, got {args.threads}")
    session = DecodeSession(folder, threads=args.threads, step_library=args.step_library)
    ids, tok = _prompt_ids(args, folder, session.manifest)
    out = generate(session, ids, args.max_new_tokens, stop_at_eos=not args.ignore_eos)
    text = tok.decode(out.tokens) if tok is not None else None
    if args.json:
        print(json.dumps({"tokens": out.tokens, **({"text": text} if text is not None else {})}))
    else:
        print(" ".join(str(t) for t in out.tokens))
        if text is not None:
            print(text)
    return 0


def add_commands(sub: Any) -> None:
    """Add ``generate`` to the CLI's subparsers (``softswap.commands`` entry point)."""
    p = sub.add_parser("generate", help="greedy generation with a --decode folder (onnxruntime)")
    p.add_argument("folder", help="folder written by `softswap convert ... --decode`")
    p.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 5,17,42")
    p.add_argument("--prompt", help="prompt text (needs tokenizer files in the folder)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    p.add_argument("--step-library", metavar="LIB", help="run the step with this `softswap compile` artefact of "
                                                          "FOLDER/step.onnx (TVM) instead of onnxruntime")
    p.add_argument("--json", action="store_true", help='print {"tokens": [...]} (and "text" with a tokenizer)')
    p.set_defaults(func=run_generate)
