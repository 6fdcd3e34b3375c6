"""Classifier heads: the final Linear / Gemm / MatMul producing class scores, optionally followed by (Log)Softmax."""
from __future__ import annotations

from typing import Any

from ..graph.base import GraphView
from ..sites import ClassifierHead
from .common import HEAD_STEPS, PASS_THROUGH, Spelling

HEAD_SPELLINGS: tuple[Spelling, ...] = (
    Spelling("head", ("softmax",), "activation", "softmax / log-softmax on the graph output (absorbed by the head)"),
    Spelling("head", PASS_THROUGH + ("reshape",), "pass-through", "cast / identity / reshape"),
    Spelling("head", ("add",), "bias", "MatMul + Add(constant bias)"),
    Spelling("head", ("linear", "matmul"), "linear", "Linear / Gemm / MatMul with a constant 2-D weight, >= 2 "
             "classes, 2-D output"),
)


def linear_weight(g: GraphView, node: Any) -> tuple[int | None, int | None] | None:
    """(in_features, out_features) if ``node`` is a Linear/Gemm/MatMul with a constant 2-D weight."""
    canon = g.canon(node)
    if canon is None:
        return None
    if canon.kind == "linear":
        w = canon.inputs[1]
        shape = g.shape(w)
        if shape is None or len(shape) != 2 or not g.is_constant(w):
            return None
        return (shape[1], shape[0]) if canon.attrs.get("weight_layout") == "out_in" else (shape[0], shape[1])
    if canon.kind == "matmul" and len(canon.inputs) == 2:
        w = canon.inputs[1]
        shape = g.shape(w)
        if shape is None or len(shape) != 2 or not g.is_constant(w):
            return None
        return shape[0], shape[1]
    return None


def find_heads(g: GraphView, outputs: list[Any]) -> tuple[list[ClassifierHead], set]:
    """Classifier heads feeding graph ``outputs``, and the ids of softmax nodes they absorb."""
    heads: list[ClassifierHead] = []
    absorbed: set = set()
    for out in outputs:
        value, activation, act_node, scores = out, "none", None, None
        for _ in range(HEAD_STEPS):
            node = g.producer(value)
            canon = g.canon(node)
            if canon is None:
                break
            if canon.kind == "softmax" and activation == "none":
                activation, act_node = ("log_softmax" if canon.attrs["log"] else "softmax"), node
                value = canon.inputs[0]
                continue
            if canon.kind in PASS_THROUGH or canon.kind == "reshape":
                value = canon.inputs[0]
                continue
            if canon.kind == "add":  # MatMul + Add(bias)
                a, b = canon.inputs[:2]
                inner = a if g.is_constant(b) else (b if g.is_constant(a) else None)
                if inner is not None and linear_weight(g, g.producer(inner)) is not None:
                    scores = value
                    value = inner
                    continue
            dims = linear_weight(g, node)
            out_shape = g.shape(g.outputs(node)[0])
            final_shape = g.shape(out)
            if dims is not None and isinstance(dims[1], int) and dims[1] >= 2 and out_shape is not None \
                    and len(out_shape) == 2 and final_shape is not None and len(final_shape) == 2:
                heads.append(ClassifierHead(name=f"head{len(heads)}", node=g.node_name(node), in_features=dims[0],
                                            num_classes=dims[1], activation=activation, output=g.value_name(out),
                                            feature=canon.inputs[0], scores=scores if scores is not None else value,
                                            output_value=out, activation_node=act_node))
                if act_node is not None:
                    absorbed.add(id(act_node))
            break
    return heads, absorbed
