"""Recognition over the zoo: every real architecture in FX and ONNX (dynamo and legacy exporters) yields exactly
the expected attention sites (scale to 1e-6, causal flag, mask kind, heads, kv heads, head dim); negative twins
yield no site and the stated reason; `attention.reference` leaves outputs unchanged (1e-5), and its output
re-inspects to the same sites (the canonical form stays recognizable, so rewriting with it is idempotent)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rewrite
import zoo
from rewrite.io import from_exported_program, load_onnx

REASON_WORDS = {  # twin defect -> words the reason must contain
    "k_not_transposed": "transpose of the last two axes",
    "softmax_axis": "softmax over the last axis",
    "probs_escape": "used only by the P·V matmul",
    "scale_not_scalar": "scalar scale",
    "no_pv_matmul": "feeding a matmul with V",
    # (B, S, 2, D) -> (B, 2, S, D): refused as a reordering reshape, or, where the exporter folds it into the
    # head split (dynamo: (B, S, 2·D) -> (B, 2, S, D)), as a head split with the tokens on the wrong side
    "kv_reshape": ("not by a reshape", "heads and features in the last two axes of the head split"),
}


def _load(name: str, exporter: str, zoo_fx, zoo_onnx):
    zm = zoo.get(name)
    if exporter == "fx":
        module, args, _ = zm.build()
        ep = zoo_fx(name)
        b = zm.built()
        names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        return from_exported_program(ep, source=name, example_inputs=dict(zip(names, args)))
    loaded = load_onnx(zoo_onnx(name, exporter))
    _, args, _ = zm.build()
    loaded.example_inputs = {n: a.numpy() for n, a in zip(loaded.input_names, args)}
    loaded.extra["feeds"] = loaded.example_inputs
    return loaded


def _sorted(sites):
    return sorted(sites, key=lambda s: (s.mask, s.heads or 0))


def _site_keys(sites):
    return sorted((round(s.scale, 6), s.causal, s.mask, s.heads, s.kv_heads, s.head_dim) for s in sites)


@pytest.mark.parametrize("name,exporter", zoo.params(exporters=True))
def test_sites_match_expectation(name, exporter, zoo_fx, zoo_onnx):
    zm = zoo.get(name)
    report = rewrite.inspect(_load(name, exporter, zoo_fx, zoo_onnx))
    found = report.attention_sites
    if zm.negative:
        assert not found, f"negative twin matched: {[s.summary() for s in found]}"
        reasons = " | ".join(str(r) for _, r in report.unmatched)
        words = REASON_WORDS[zm.expected_reason]
        assert any(w in reasons for w in ((words,) if isinstance(words, str) else words)), reasons
        return
    assert len(found) == len(zm.expected), [s.summary() for s in found]
    for got, want in zip(found, zm.expected):
        assert got.scale == pytest.approx(want.scale, rel=1e-6)
        assert got.causal == want.causal, got.summary()
        assert got.mask == want.mask, got.summary()
        assert got.heads == want.heads and got.kv_heads == want.kv_heads and got.head_dim == want.head_dim, \
            got.summary()
    assert not [u for u in report.unmatched], report.to_dict()["unmatched"]
    assert len(report.heads) == zm.classifier_heads, report.to_dict()["heads"]


@pytest.mark.parametrize("name,exporter", [p for p in zoo.params(exporters=True)
                                           if not zoo.get(p.values[0]).negative and zoo.get(p.values[0]).expected])
def test_reference_rewrite_keeps_outputs(name, exporter, zoo_fx, zoo_onnx):
    loaded = _load(name, exporter, zoo_fx, zoo_onnx)
    new, report = rewrite.convert(loaded, attention="reference")
    passes = report["passes"][0]
    assert passes["replaced"] == len(zoo.get(name).expected)
    assert report["fidelity"]["max_abs"] < 1e-5, report["fidelity"]
    for site in passes["sites"]:
        assert site["fidelity"]["rel_error"] < 1e-5
    again = rewrite.inspect(new)  # the canonical form is recognized as the same sites
    assert _site_keys(again.attention_sites) == _site_keys(rewrite.inspect(loaded).attention_sites), \
        again.to_dict()["unmatched"]
    assert not again.unmatched, again.to_dict()["unmatched"]
    other = zoo.get(name).inputs(3, 12)  # dynamic dims survive the rewrite
    if other is not None and exporter not in zoo.get(name).static:
        feeds = {n: a.numpy() for n, a in zip(loaded.input_names, other)}
        assert rewrite.verify(loaded, new, inputs=feeds).max_abs < 1e-5
    if new.kind == "onnx":  # a valid model, same output names, topologically sorted
        import onnx
        import onnx_ir as ir
        onnx.checker.check_model(ir.to_proto(new.onnx))
        assert [o.name for o in new.onnx.graph.outputs] == [o.name for o in loaded.onnx.graph.outputs]
        seen = {v.name for v in new.onnx.graph.inputs} | set(new.onnx.graph.initializers)
        for node in new.onnx.graph:
            assert all(i is None or i.name in seen or i.const_value is not None or i.name == "" for i in node.inputs)
            seen.update(o.name for o in node.outputs)
    if new.kind == "onnx":  # replacement nodes carry their provenance; the old chain is gone
        tagged = [n for n in new.onnx.graph if "rw.rule" in n.metadata_props]
        assert tagged
        originals = {s["nodes"][0] for s in passes["sites"]}
        assert not originals & {n.name for n in new.onnx.graph}
