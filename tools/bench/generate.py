"""Per-token decode latency: the linear-attention step graph (``softswap convert --decode``, onnxruntime; and the
sliding-window hybrid's with ``--hybrid-window W``) against the original softmax model decoding with a KV cache,
in torch (transformers ``DynamicCache``, the ``generate``-style ``past_key_values`` path) and in onnxruntime (the
model's one-token step exported with past/present keys and values, :mod:`passes.decode.kv_cache`), at several
context lengths; and the memory of the recurrent state against the KV cache's.

The state has a constant size, so the step at context C is timed with a state from a short prefill and the
position C (RoPE is evaluated at C); the KV cache at context C is filled with random keys/values of length C
(the step's cost depends on the cache length, not its content) and cropped back to C after each timed call; the
onnxruntime KV step gets the same keys/values as inputs and returns the present cache (length C + 1) as the usual
exported decoders do (its output copy is part of the time, as torch's concatenation is). Before timing, the two
KV-cache decoders' logits are compared on the same cache (they must agree to 1e-4).
Calls alternate one by one between the contexts and the two decoders, so a loaded host shifts all cells alike;
each cell reports the median and the 10th/90th percentiles.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/generate.py [--contexts 256,4096,16384] [--rounds 5]
        [--steps 20] [--hybrid-window 64] [--out tools/bench/results/generate.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from machine import describe  # noqa: E402

#: A small Llama-style LM with GQA (8 query heads, 4 KV heads, head_dim 64); random weights.
CONFIG = dict(vocab_size=1000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=1024, max_position_embeddings=32768, use_cache=True, bos_token_id=1, eos_token_id=2)


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **CONFIG)).eval()


def _kv_cache(model, ctx: int):
    import torch
    from transformers import DynamicCache
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    g = torch.Generator().manual_seed(ctx)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, ctx, d, generator=g)
        cache.update(k, torch.randn(k.shape, generator=g), layer)
    return cache


def _kv_step(model, cache, ctx: int) -> float:
    """Seconds of one decode step with a KV cache of length ``ctx`` (the cache is cropped back to ``ctx``)."""
    import torch
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[ctx]]), past_key_values=cache,
              use_cache=True)
        dt = time.perf_counter() - t0
    cache.crop(-1)  # drop the token just appended: the cache is back to length ctx
    assert cache.get_seq_length() == ctx
    return dt


def _kv_feeds(cache, ctx: int) -> dict:
    """The onnxruntime KV step's inputs: the token at position ``ctx`` and the cache's keys/values as past.*."""
    import numpy as np
    feeds = {"input_ids": np.asarray([[7]], dtype=np.int64), "positions": np.asarray([[ctx]], dtype=np.int64)}
    for i, layer in enumerate(cache.layers):
        feeds[f"past.{i}.k"] = layer.keys.numpy().copy()
        feeds[f"past.{i}.v"] = layer.values.numpy().copy()
    return feeds


def _ort_kv_step(session, feeds) -> float:
    """Seconds of one onnxruntime KV-cache step (past → logits + present)."""
    t0 = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - t0


def _check_kv_agree(model, cache, session, feeds, ctx: int) -> float:
    """Largest difference between the torch and onnxruntime KV-cache steps' logits on the same cache (≤ 1e-4)."""
    import numpy as np
    import torch
    with torch.no_grad():
        want = model(input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[ctx]]), past_key_values=cache,
                     use_cache=True).logits[0, 0].numpy()
    cache.crop(-1)
    got = session.run(["logits"], feeds)[0][0, 0]
    err = float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))
    if err > 1e-4:
        raise SystemExit(f"onnxruntime KV step disagrees with torch at context {ctx}: {err:.2e}")
    return err


def _linear_step(session, states, ctx: int) -> float:
    """Seconds of one step-graph call at position ``ctx``."""
    import numpy as np
    ids = np.asarray([[7]], dtype=np.int64)
    t0 = time.perf_counter()
    session.step(ids, ctx, states)
    return time.perf_counter() - t0


def _p10_p90(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=10)
    return [round(q[0], 3), round(q[-1], 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="256,4096,16384")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--hybrid-window", type=int, default=64, help="also time the hybrid step (0: skip)")
    parser.add_argument("--out", default="tools/bench/results/generate.json")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    import numpy as np
    import onnxruntime as ort
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from passes.decode import DecodeSession, export_decode
    from passes.decode.kv_cache import export_kv_step

    model = _model()
    tmp = Path(tempfile.mkdtemp(prefix="softswap-generate-bench-"))
    t0 = time.perf_counter()
    _, report = export_decode(model, tmp / "dec", attention="linear")
    export_s = time.perf_counter() - t0
    decoders = {"linear": DecodeSession(tmp / "dec", threads=1)}
    if args.hybrid_window:
        export_decode(model, tmp / "hyb", attention="linear", options={"window": args.hybrid_window})
        decoders["hybrid"] = DecodeSession(tmp / "hyb", threads=1)
    export_kv_step(model, tmp / "kv")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    kv_sess = ort.InferenceSession(str(tmp / "kv" / "kv_step.onnx"), opts, providers=["CPUExecutionProvider"])
    prompt = np.arange(3, 19, dtype=np.int64)[None]
    states = {name: sess.prefill(prompt)[1] for name, sess in decoders.items()}
    state_bytes = {name: sum(int(s.nbytes) for s in st) for name, st in states.items()}
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    caches = {c: _kv_cache(model, c) for c in contexts}
    feeds = {c: _kv_feeds(caches[c], c) for c in contexts}
    agree = {c: _check_kv_agree(model, caches[c], kv_sess, feeds[c], c) for c in contexts}
    times: dict[str, dict[int, list[float]]] = {k: {c: [] for c in contexts}
                                                for k in (*decoders, "kv_torch", "kv_ort")}

    def one_round(record: bool) -> None:
        for c in contexts:
            cells = {name: _linear_step(sess, states[name], c) for name, sess in decoders.items()}
            cells["kv_torch"] = _kv_step(model, caches[c], c)
            cells["kv_ort"] = _ort_kv_step(kv_sess, feeds[c])
            if record:
                for k, dt in cells.items():
                    times[k][c].append(dt * 1e3)

    one_round(False)  # warm-up
    for r in range(args.rounds):  # one call per context and decoder in turn: load shifts all of them alike
        for _ in range(args.steps):
            one_round(True)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for c in contexts:
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * c * d * 4
        row = {"context": c, "linear_step_ort_ms": statistics.median(times["linear"][c]),
               "softmax_kv_torch_ms": statistics.median(times["kv_torch"][c]),
               "softmax_kv_ort_ms": statistics.median(times["kv_ort"][c]),
               "linear_step_p10_p90_ms": _p10_p90(times["linear"][c]),
               "softmax_kv_p10_p90_ms": _p10_p90(times["kv_torch"][c]),
               "softmax_kv_ort_p10_p90_ms": _p10_p90(times["kv_ort"][c]),
               "state_bytes": state_bytes["linear"], "kv_cache_bytes": kv_bytes, "kv_logits_agree": agree[c]}
        if "hybrid" in decoders:
            row.update({"hybrid_step_ort_ms": statistics.median(times["hybrid"][c]),
                        "hybrid_step_p10_p90_ms": _p10_p90(times["hybrid"][c]),
                        "hybrid_state_bytes": state_bytes["hybrid"]})
        rows.append(row)
    best = [r["linear_step_ort_ms"] for r in rows]
    spread = max(best) / min(best) - 1.0
    result = {"machine": describe(), "python": platform.python_version(), "torch": torch.__version__,
              "onnxruntime": ort.__version__, "config": CONFIG, "threads": 1, "rounds": args.rounds,
              "steps": args.steps, "hybrid_window": args.hybrid_window,
              "export_seconds": round(export_s, 1), "state": report["decode"]["state"][:2], "rows": rows,
              "linear_step_spread": spread, "flat_within_10pct": spread <= 0.10}
    print(f"{describe()}; 1 thread; median of {args.rounds * args.steps} interleaved steps per cell")
    hyb = "hybrid" in decoders
    print(f"{'context':>8} {'linear ORT ms':>14}" + (f" {'hybrid ORT ms':>14}" if hyb else "")
          + f" {'softmax+KV torch ms':>20} {'softmax+KV ORT ms':>18} {'state KiB':>10}"
          + (f" {'hybrid KiB':>10}" if hyb else "") + f" {'KV cache KiB':>13}")
    for r in rows:
        print(f"{r['context']:>8} {r['linear_step_ort_ms']:>14.3f}"
              + (f" {r['hybrid_step_ort_ms']:>14.3f}" if hyb else "")
              + f" {r['softmax_kv_torch_ms']:>20.3f} {r['softmax_kv_ort_ms']:>18.3f} {r['state_bytes'] / 1024:>10.0f}"
              + (f" {r['hybrid_state_bytes'] / 1024:>10.0f}" if hyb else "") + f" {r['kv_cache_bytes'] / 1024:>13.0f}")
    print(f"linear step latency spread across contexts: {spread * 100:.1f}% (flat within 10%: "
          f"{result['flat_within_10pct']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
