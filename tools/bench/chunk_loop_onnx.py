"""The causal linear-attention core as an ONNX ``Loop`` over chunks (the alternative to the gather-chunked form that
issue #16 asks to measure), built directly with ``onnx.helper``: torch.export cannot trace a data-dependent loop.

``loop_core_model(heads, f, e, chunk)`` → a model with inputs ``fq`` (B,H,N,F), ``fk`` (B,H,N,F), ``v`` (B,H,N,E)
(B and N dynamic) and output ``out`` (B,H,N,E), out_i = fq_iᵀ Σ_{j<=i} fk_j v_jᵀ — what
``passes.attention.linear_core.causal_apply`` computes (the callers fold denominators in as a ones column of v).
The rows are zero-padded to nc·C (nc = ⌈N / C⌉) and split into (B,H,nc,C,·); the Loop runs nc iterations with the
running state S (B,H,F,E) as its carried value: chunk c's output is tril(q_c k_cᵀ) v_c + q_c S, then
S += k_cᵀ v_c; the per-chunk outputs are the Loop's scan output (nc,B,H,C,E), put back in row order and cut to N.
Memory O(N·(F+E) + C² + F·E) per head; the work is sequential over chunks (one iteration per chunk).
ONNX-only: TVM's Relax ONNX importer has no ``Loop``.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _body(chunk: int) -> onnx.GraphProto:
    """Loop body: (iter c, cond, S) → (cond, S + k_cᵀ v_c, out_c)."""
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Gather", ["q5", "c"], ["qc"], axis=2),  # (B,H,C,F); outer-scope q5, k5, v5
        helper.make_node("Gather", ["k5", "c"], ["kc"], axis=2),
        helper.make_node("Gather", ["v5", "c"], ["vc"], axis=2),
        helper.make_node("Transpose", ["kc"], ["kct"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qc", "kct"], ["a"]),
        helper.make_node("Mul", ["a", "tril"], ["am"]),
        helper.make_node("MatMul", ["am", "vc"], ["intra"]),
        helper.make_node("MatMul", ["qc", "s_in"], ["inter"]),
        helper.make_node("Add", ["intra", "inter"], ["out_c"]),
        helper.make_node("MatMul", ["kct", "vc"], ["ds"]),
        helper.make_node("Add", ["s_in", "ds"], ["s_out"]),
    ]
    return helper.make_graph(
        nodes, "chunk",
        [helper.make_tensor_value_info("c", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", f32, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", f32, None),
         helper.make_tensor_value_info("out_c", f32, None)])


def loop_core_model(heads: int, f: int, e: int, chunk: int = 64, opset: int = 18) -> onnx.ModelProto:
    """The Loop-over-chunks causal core for ``heads`` heads, feature dim ``f``, value dim ``e``, chunk ``chunk``."""
    f32 = TensorProto.FLOAT
    c = chunk
    nodes = [
        _const("tril", np.tril(np.ones((c, c), np.float32))),
        _const("C", np.array([c], np.int64)),
        _const("Cm1", np.array([c - 1], np.int64)),
        _const("zero1", np.array([0], np.int64)),
        _const("two", np.array([2], np.int64)),
        _const("hfe", np.array([heads, f, e], np.int64)),
        _const("true", np.array(True)),
        helper.make_node("Shape", ["fq"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero1"], ["B"], axis=0),
        helper.make_node("Gather", ["shape", "two"], ["N"], axis=0),
        helper.make_node("Add", ["N", "Cm1"], ["Nc"]),
        helper.make_node("Div", ["Nc", "C"], ["nc"]),  # ⌈N / C⌉ (int64 Div truncates; N > 0)
        helper.make_node("Mul", ["nc", "C"], ["Np"]),
        helper.make_node("Sub", ["Np", "N"], ["pad"]),
        # pads for (B,H,N,·): zeros everywhere except the end of axis 2
        helper.make_node("Concat", ["zero1", "zero1", "zero1", "zero1", "zero1", "zero1", "pad", "zero1"],
                         ["pads"], axis=0),
    ]
    for name, width in (("fq", f), ("fk", f), ("v", e)):
        nodes += [
            helper.make_node("Pad", [name, "pads"], [name + "_p"], mode="constant"),
            _const(name + "_tail", np.array([heads], np.int64)),
            _const(name + "_w", np.array([c, width], np.int64)),
            helper.make_node("Concat", ["B", name + "_tail", "nc", name + "_w"], [name + "_shape5"], axis=0),
            helper.make_node("Reshape", [name + "_p", name + "_shape5"], [{"fq": "q5", "fk": "k5", "v": "v5"}[name]]),
        ]
    nodes += [
        helper.make_node("Concat", ["B", "hfe"], ["s_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["s_shape"], ["s0"],
                         value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Squeeze", ["nc"], ["trips"]),
        helper.make_node("Loop", ["trips", "true", "s0"], ["s_final", "chunks"], body=_body(c)),  # (nc,B,H,C,E)
        helper.make_node("Transpose", ["chunks"], ["chunks_t"], perm=[1, 2, 0, 3, 4]),  # (B,H,nc,C,E)
        _const("e_tail", np.array([heads], np.int64)),
        _const("e_w", np.array([e], np.int64)),
        helper.make_node("Concat", ["B", "e_tail", "Np", "e_w"], ["rows_shape"], axis=0),
        helper.make_node("Reshape", ["chunks_t", "rows_shape"], ["rows"]),
        helper.make_node("Slice", ["rows", "zero1", "N", "two"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "causal_loop_core",
        [helper.make_tensor_value_info("fq", f32, ["B", heads, "N", f]),
         helper.make_tensor_value_info("fk", f32, ["B", heads, "N", f]),
         helper.make_tensor_value_info("v", f32, ["B", heads, "N", e])],
        [helper.make_tensor_value_info("out", f32, ["B", heads, "N", e])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model
