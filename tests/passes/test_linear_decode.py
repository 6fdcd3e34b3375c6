"""Causal linear attention as an RNN: prompt state + one step at a time equals the full causal output (1e-5, fp32)
in torch and in a standalone ONNX step graph run by onnxruntime; the state's shape does not depend on position."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from passes.attention.featuremaps import init_hedgehog
from passes.attention.linear import linear_attention
from passes.attention.linear_decode import LinearStep, prefill_state, step

SCALE = 0.35
B, H, D, P, N = 2, 3, 8, 5, 11  # prompt P tokens, then N decoded tokens


def _seq(seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, P + N, D, generator=g) for _ in range(3))


def _err(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("opts", [{}, {"feature_map": "hedgehog"}, {"feature_map": "taylor2"}, {"scale_qk": True}],
                         ids=["elu", "hedgehog", "taylor2", "scale_qk"])
def test_prompt_then_steps_equals_full_causal(opts):
    q, k, v = _seq(0)
    params = None
    if opts.get("feature_map") == "hedgehog":
        g = torch.Generator().manual_seed(1)
        w = init_hedgehog(H, D) + 0.1 * torch.randn(H, D, D, generator=g)
        params = {"fmap_q": w, "fmap_k": w.flip(-1)}
    full = linear_attention(q, k, v, scale=SCALE, causal=True, params=params, causal_form="loop", chunk_size=1,
                            **opts)
    prompt = linear_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], scale=SCALE, causal=True, params=params, **opts)
    state, z = prefill_state(k[:, :, :P], v[:, :, :P], scale=SCALE, params=params, **opts)
    outs, shapes = [prompt], set()
    for t in range(P, P + N):
        y, state, z = step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, z, scale=SCALE,
                           params=params, **opts)
        outs.append(y)
        shapes.add((tuple(state.shape), tuple(z.shape)))
    assert len(shapes) == 1  # state size independent of the position
    assert _err(torch.cat(outs, dim=2), full) <= 1e-5


def test_onnx_step_graph_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    q, k, v = _seq(2)
    m = LinearStep(scale=SCALE)
    state, z = prefill_state(k[:, :, :P], v[:, :, :P], scale=SCALE)
    args = (q[:, :, P:P + 1], k[:, :, P:P + 1], v[:, :, P:P + 1], state, z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        onx = torch.onnx.export(m, args, dynamo=True, opset_version=18, verbose=False,
                                input_names=["q", "k", "v", "state", "z"], output_names=["y", "state_out", "z_out"])
    path = tmp_path / "step.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    full = linear_attention(q, k, v, scale=SCALE, causal=True, causal_form="loop", chunk_size=1)
    prompt = linear_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], scale=SCALE, causal=True)
    s_np, z_np = state.numpy(), z.numpy()
    outs = [prompt.numpy()]
    for t in range(P, P + N):
        y, s_np, z_np = sess.run(None, {"q": q[:, :, t:t + 1].numpy(), "k": k[:, :, t:t + 1].numpy(),
                                        "v": v[:, :, t:t + 1].numpy(), "state": s_np, "z": z_np})
        assert s_np.shape == (B, H, D, D) and z_np.shape == (B, H, D, 1)
        outs.append(y)
    assert _err(np.concatenate(outs, axis=2), full) <= 1e-5
