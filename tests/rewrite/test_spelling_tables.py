"""The recognizer's accepted spellings are data: every table row is well formed, every canonical kind a row names
is produced by some graph op, and `softswap inspect --spellings` prints them per graph kind."""
from __future__ import annotations

import json

from rewrite.cli import main
from rewrite.graph.vocabulary import ops_of_kind
from rewrite.recognize import SPELLING_TABLES, spellings

#: Kinds that name a condition rather than an op (documentation rows of the mask table; "any": a feature-tap rule
#: read from shapes, whatever the op).
_NOT_OPS = {"constant", "input", "any"}


def test_every_row_is_well_formed_and_names_real_ops():
    for title, rows in SPELLING_TABLES.items():
        tags = [(r.tag, r.kinds) for r in rows]
        assert len(set(tags)) == len(tags), f"duplicate row in {title}"
        for row in rows:
            assert row.accepts and row.kinds, row
            for kind in set(row.kinds) - _NOT_OPS:
                assert ops_of_kind("fx", kind) or ops_of_kind("onnx", kind), (title, row.tag, kind)


def test_listing_per_graph_kind():
    listed = spellings("onnx")
    rows = {r["tag"]: r for r in listed["explicit attention: scores (softmax up to Q·Kᵀ)"]}
    assert "MatMul" in rows["qk-matmul"]["onnx"] and "fx" not in rows["qk-matmul"]
    both = spellings()
    fused = {r["tag"]: r for r in both["fused attention ops"]}
    assert fused["sdpa"]["fx"] and not fused["sdpa"]["onnx"]
    assert fused["ort-mha"]["onnx"] == ["com.microsoft::MultiHeadAttention"]


def test_cli_lists_spellings(capsys):
    assert main(["inspect", "--spellings", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == set(SPELLING_TABLES)
    assert main(["inspect", "--spellings", "--graph", "fx"]) == 0
    text = capsys.readouterr().out
    assert "size1-move" in text and "aten.bmm.default" in text
    assert main(["inspect"]) == 2  # neither a model nor --spellings
