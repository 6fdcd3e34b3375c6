"""Recognition scales linearly: time ``rewrite.inspect`` on synthetic ONNX graphs of stacked attention blocks.

Builds graphs of about 10k and 100k nodes (``--sizes``), each block an explicit attention spelling with a head
split, a K permutation, a scale, an additive key-padding mask, softmax and the P·V matmul, plus projections and a
residual. Prints a table and writes JSON (default ``tools/bench/results/recognize.json``).

Goal: 100k nodes in under 10 s here; time from 10k to 100k grows no more than ~12x.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from machine import describe  # tools/bench/machine.py: the CPU line of every table

HIDDEN, HEADS, SEQ = 16, 2, 8
NODES_PER_BLOCK = 18


def build(blocks: int) -> onnx.ModelProto:
    """A graph of ``blocks`` stacked attention blocks (shared weights keep the file small)."""
    d = HIDDEN // HEADS
    inits = [numpy_helper.from_array(np.eye(HIDDEN, dtype=np.float32), "W"),
             numpy_helper.from_array(np.array([1, SEQ, HEADS, d], np.int64), "split"),
             numpy_helper.from_array(np.array([1, SEQ, HIDDEN], np.int64), "merge"),
             numpy_helper.from_array(np.array(d ** -0.5, np.float32), "scale")]
    nodes = []
    x = "x"
    for b in range(blocks):
        p = f"b{b}_"
        for name in ("q", "k", "v"):
            nodes.append(helper.make_node("MatMul", [x, "W"], [p + name + "_lin"]))
            nodes.append(helper.make_node("Reshape", [p + name + "_lin", "split"], [p + name + "_split"]))
        nodes.append(helper.make_node("Transpose", [p + "q_split"], [p + "q"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Transpose", [p + "k_split"], [p + "kt"], perm=[0, 2, 3, 1]))
        nodes.append(helper.make_node("Transpose", [p + "v_split"], [p + "v"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("MatMul", [p + "q", p + "kt"], [p + "scores"]))
        nodes.append(helper.make_node("Mul", [p + "scores", "scale"], [p + "scaled"]))
        nodes.append(helper.make_node("Add", [p + "scaled", "mask"], [p + "masked"]))
        nodes.append(helper.make_node("Softmax", [p + "masked"], [p + "probs"], axis=-1))
        nodes.append(helper.make_node("MatMul", [p + "probs", p + "v"], [p + "ctx"]))
        nodes.append(helper.make_node("Transpose", [p + "ctx"], [p + "ctx_t"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [p + "ctx_t", "merge"], [p + "ctx_m"]))
        nodes.append(helper.make_node("MatMul", [p + "ctx_m", "W"], [p + "out"]))
        nodes.append(helper.make_node("Add", [p + "out", x], [p + "res"]))
        x = p + "res"
    graph = helper.make_graph(
        nodes, "stacked_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, HIDDEN]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 1, SEQ])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, SEQ, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def measure(nodes: int, folder: Path) -> dict:
    import rewrite
    blocks = max(1, nodes // NODES_PER_BLOCK)
    path = folder / f"stacked_{nodes}.onnx"
    onnx.save(build(blocks), path)
    start = time.perf_counter()
    report = rewrite.inspect(path)
    seconds = time.perf_counter() - start
    return {"target_nodes": nodes, "nodes": report.node_count, "blocks": blocks,
            "sites": len(report.attention_sites), "unmatched": len(report.unmatched), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--out", default="tools/bench/results/recognize.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    print(f"CPU: {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(measure(size, Path(tmp)))
            r = rows[-1]
            print(f"{r['nodes']:>8} nodes  {r['sites']:>6} sites  {r['unmatched']} unmatched  {r['seconds']:.2f} s",
                  flush=True)
    if len(rows) >= 2:
        growth = rows[-1]["seconds"] / rows[0]["seconds"]
        size_ratio = rows[-1]["nodes"] / rows[0]["nodes"]
        print(f"time grows {growth:.1f}x for {size_ratio:.1f}x nodes")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "recognize", "cpu": describe(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
