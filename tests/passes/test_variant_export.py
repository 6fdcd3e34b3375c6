"""Every attention variant exports with dynamic sequence lengths (torch.export and torch.onnx dynamo, opset 18) and
the ONNX model, run in onnxruntime at *other* lengths, matches eager torch."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from passes.attention import VARIANTS

ort = pytest.importorskip("onnxruntime")

STANDARD_OPS = {
    "Abs", "Add", "And", "Cast", "Clip", "Concat", "CumSum", "Div", "Elu", "Equal", "Exp", "Expand", "Floor",
    "Gather", "GatherND", "GatherElements", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Log", "MatMul", "Max", "Min", "Mul", "Neg", "Not",
    "Pad", "Range", "Reciprocal", "ReduceMax", "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax",
    "Softplus", "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where", "Pow", "ReverseSequence", "Tile",
    "ConstantOfShape", "Identity", "Constant", "Sum", "Mod", "Div", "Or", "Sigmoid", "ScatterND",
}


class _Wrap(torch.nn.Module):
    def __init__(self, fn, causal: bool, options: dict):
        super().__init__()
        self.fn, self.causal, self.options = fn, causal, options

    def forward(self, q, k, v, kp=None):
        return self.fn(q, k, v, scale=0.35, causal=self.causal, key_padding=kp, **self.options)


def _inputs(s_len, t_len, pad, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, s_len, 8, generator=g)
    k = torch.randn(1, 2, t_len, 8, generator=g)
    v = torch.randn(1, 2, t_len, 8, generator=g)
    if not pad:
        return (q, k, v)
    kp = torch.ones(1, t_len, dtype=torch.bool)
    kp[:, -3:] = False
    return (q, k, v, kp)


CASES = []
for _name, _var in VARIANTS.items():
    CASES.append((_name, False, False, {}, True))
    if "causal" in _var.mask_kinds:
        CASES.append((_name, True, False, {}, True))
    if "key_padding" in _var.mask_kinds:
        CASES.append((_name, "causal" in _var.mask_kinds, True, {}, True))
CASES += [
    ("linear", True, False, {}, False),  # distinct dynamic S and T (bottom-right causal, S != T at run time)
    ("linear", True, True, {"window": 4}, True),  # hybrid sliding window
    ("mala", False, False, {"window": 3}, True),
    ("linear", False, False, {"feature_map": "hedgehog"}, True),
]


@pytest.mark.parametrize("name,causal,pad,options,same", CASES,
                         ids=[f"{c[0]}-{'causal' if c[1] else 'full'}-{'pad' if c[2] else 'nopad'}-"
                              f"{'_'.join(f'{k}{v}' for k, v in c[3].items()) or 'plain'}-{'same' if c[4] else 'diff'}"
                              for c in CASES])
def test_export_onnx_matches_torch(name, causal, pad, options, same, tmp_path):
    var = VARIANTS[name]
    m = _Wrap(var.fn, causal, options)
    s_dim = torch.export.Dim("S", min=2, max=8192)
    t_dim = s_dim if same else torch.export.Dim("T", min=2, max=8192)
    ds = {"q": {2: s_dim}, "k": {2: t_dim}, "v": {2: t_dim}}
    args = _inputs(12, 12 if same else 15, pad, 0)
    if pad:
        ds["kp"] = {1: t_dim}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        ep = torch.export.export(m, args, dynamic_shapes=ds)
        assert ep.graph_module is not None
        onx = torch.onnx.export(m, args, dynamic_shapes=ds, dynamo=True, opset_version=18, verbose=False)
    path = tmp_path / "m.onnx"
    onx.save(str(path))
    ops = {n.op_type for n in onx.model_proto.graph.node}
    assert ops <= STANDARD_OPS, f"non-standard ops {ops - STANDARD_OPS}"
    if name != "reference":
        assert "Softmax" not in ops or options.get("feature_map") == "hedgehog"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for s_len, t_len in ([(37, 37), (70, 70)] if same else [(23, 40), (40, 23)]):
        new = _inputs(s_len, t_len, pad, 1)
        feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), new)}
        got = sess.run(None, feeds)[0]
        ref = m(*new).numpy()
        assert got.shape == ref.shape
        err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
