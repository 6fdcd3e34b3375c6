"""Attention transfer (passes/transfer) on a tiny random BERT, in FX and in ONNX.

The tiny BERT's query/key weights are scaled up so that its attention is peaked (a random BERT's attention is
almost uniform, which every variant matches trivially). Margins asserted: after fitting, every site's held-out
relative error is at most ``REL_FACTOR`` × the untrained swap's, and its cosine is higher.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path as _Path
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from passes.attention import get_variant  # noqa: E402
from passes.transfer import (CalibrationDataError, TransferError, fit_params, load_calibration,  # noqa: E402
                             rewrite_with_params, transfer, transfer_options)
from passes.transfer.cli import main as cli_main  # noqa: E402
from rewrite.errors import OptionError  # noqa: E402
sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
from transfer_models import tiny_bert  # noqa: E402
from rewrite.io import LoadedModel, fx_to_onnx, load_model  # noqa: E402
from rewrite.verify import run as run_model  # noqa: E402

#: After fitting, held-out site rel. error <= REL_FACTOR × the untrained swap's (and cosine strictly higher).
REL_FACTOR = 0.9
VARIANTS = ("linear", "mala", "sigmoid", "softplus")
FIT = dict(steps=40, batch_size=4, progress=False)
#: Sigmoid starts at b = −ln 2048 (row mass ≈ n/2048, output ≈ 0): its bias needs more steps to reach the scale.
STEPS = {"sigmoid": 150}


def _tiny_bert() -> LoadedModel:
    return tiny_bert()


@pytest.fixture(scope="module")
def tiny_fx() -> LoadedModel:
    return _tiny_bert()


@pytest.fixture(scope="module")
def tiny_onnx(tiny_fx: LoadedModel) -> LoadedModel:
    loaded = load_model(fx_to_onnx(tiny_fx))
    loaded.source = "tiny-bert.onnx"
    return loaded


def _assert_improved(report: dict, variant: str) -> None:
    assert report["sites"], "no site was fitted"
    for name, row in report["sites"].items():
        b, a = row["before"], row["after"]
        assert row["steps"] == STEPS.get(variant, FIT["steps"])
        assert a["rel_error"] <= REL_FACTOR * b["rel_error"], (variant, name, b, a)
        assert a["cosine"] > b["cosine"], (variant, name, b, a)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transfer_improves_sites_fx(tiny_fx: LoadedModel, variant: str) -> None:
    _, _, params, report = fit_params(tiny_fx, attention=variant, **{**FIT, "steps": STEPS.get(variant, 40)})
    _assert_improved(report, variant)
    assert set(params) == {"attn0", "attn1"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_transfer_improves_sites_onnx(tiny_onnx: LoadedModel, variant: str) -> None:
    _, _, _, report = fit_params(tiny_onnx, attention=variant, **{**FIT, "steps": STEPS.get(variant, 40)})
    assert report["graph"] == "onnx"
    _assert_improved(report, variant)


def test_transfer_defaults_hedgehog_and_window() -> None:
    lin = get_variant("linear")
    assert transfer_options(lin, None, 0) == {"feature_map": "hedgehog"}
    assert transfer_options(lin, {"feature_map": "elu"}, 8) == {"feature_map": "elu", "window": 8}
    with pytest.raises(OptionError):
        transfer_options(get_variant("sigmoid"), None, 8)


def test_fitted_fx_and_onnx_agree(tiny_fx: LoadedModel, tiny_onnx: LoadedModel, tmp_path: Path) -> None:
    """Fit once in FX (full transfer: rewrite + model fidelity), write the same params into the ONNX conversion."""
    fitted_fx, report = transfer(tiny_fx, attention="linear", hybrid_window=4, **FIT)
    mf = report["model_fidelity"]
    assert mf["after"]["outputs"]["last_hidden_state"]["rel_error"] < mf["before"]["outputs"]["last_hidden_state"]["rel_error"]
    params = fitted_fx.extra["transfer"]["params"]
    assert set(params["attn0"]) == {"fmap_q", "fmap_k", "window_gate"}
    opts = fitted_fx.extra["transfer"]["options"]
    fitted_onnx = rewrite_with_params(tiny_onnx, params, attention="linear", options=opts)
    assert fitted_onnx.kind == "onnx"
    feeds = {k: v.numpy() for k, v in tiny_fx.extra["hf"].make_inputs(3, 11, seed=7).items()}
    a = run_model(fitted_fx, feeds)["last_hidden_state"]
    b = run_model(fitted_onnx, feeds)["last_hidden_state"]
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    untrained = run_model(rewrite_with_params(tiny_fx, {}, attention="linear", options=opts), feeds)
    assert np.abs(untrained["last_hidden_state"] - a).max() > 1e-3  # the params did change the model


def test_same_seed_same_params(tiny_fx: LoadedModel) -> None:
    kw = dict(attention="mala", steps=8, batch_size=4, progress=False)
    _, _, p1, _ = fit_params(tiny_fx, seed=3, **kw)
    _, _, p2, _ = fit_params(tiny_fx, seed=3, **kw)
    _, _, p3, _ = fit_params(tiny_fx, seed=4, **kw)
    for site in p1:
        for k in p1[site]:
            assert torch.equal(p1[site][k], p2[site][k]), (site, k)
    assert any(not torch.equal(p1[s][k], p3[s][k]) for s in p1 for k in p1[s])


def test_resume_from_checkpoint_equals_one_run(tiny_fx: LoadedModel, tmp_path: Path) -> None:
    kw = dict(attention="sigmoid", batch_size=4, progress=False, seed=1)
    ckpt = tmp_path / "ckpt.pt"
    _, _, _, r1 = fit_params(tiny_fx, steps=6, checkpoint=ckpt, **kw)
    assert ckpt.exists() and all(row["steps"] == 6 for row in r1["sites"].values())
    _, _, resumed, r2 = fit_params(tiny_fx, steps=12, checkpoint=ckpt, **kw)
    assert all(row["steps"] == 12 for row in r2["sites"].values())
    _, _, straight, _ = fit_params(tiny_fx, steps=12, **kw)
    for site in straight:
        for k in straight[site]:
            torch.testing.assert_close(resumed[site][k], straight[site][k], rtol=1e-6, atol=1e-7)
    with pytest.raises(TransferError, match="ckpt.pt"):  # same checkpoint, another variant
        fit_params(tiny_fx, steps=12, checkpoint=ckpt, **{**kw, "attention": "softplus"})


def test_bad_data_files(tiny_fx: LoadedModel, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(CalibrationDataError, match="bad.npz"):
        load_calibration(tiny_fx, bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, input_ids=np.ones((8, 6), dtype=np.int64))
    with pytest.raises(CalibrationDataError, match=r"partial\.npz.*attention_mask"):
        load_calibration(tiny_fx, partial)
    with pytest.raises(CalibrationDataError, match="missing.txt"):
        load_calibration(tiny_fx, tmp_path / "missing.txt")
    text = tmp_path / "lines.txt"
    text.write_text("one line\nanother\n")
    with pytest.raises(CalibrationDataError, match="tokenizer"):  # the tiny BERT has no tokenizer folder
        load_calibration(tiny_fx, text)


def test_npz_and_text_data(tiny_fx: LoadedModel, tmp_path: Path) -> None:
    from rewrite.hf import minilm_path
    feeds = {k: v.numpy() for k, v in tiny_fx.extra["hf"].make_inputs(10, 9, seed=5).items()}
    np.savez(tmp_path / "cal.npz", **feeds)
    cal = load_calibration(tiny_fx, tmp_path / "cal.npz", batch_size=4)
    assert len(cal.train) == 2 and len(cal.held_out) == 1
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(f"Sentence number {i} is about attention transfer." for i in range(12)))
    cal = load_calibration(tiny_fx, text, batch_size=4, tokenizer=minilm_path())
    assert cal.samples == {"train_samples": 10, "held_out_samples": 2}
    assert set(cal.train[0]) == {"input_ids", "attention_mask", "token_type_ids"}


def test_cli(tiny_onnx: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx_ir as ir
    src = tmp_path / "tiny.onnx"
    ir.save(tiny_onnx.onnx, src)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    rc = cli_main(["transfer", str(src), "-o", str(tmp_path / "o.onnx"), "--attention", "linear", "--data", str(bad),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.npz" in err and len(err.strip().splitlines()) == 1
    rc = cli_main(["transfer", str(src), "-o", str(tmp_path / "o.onnx"), "--attention", "linear",
                   "--option", "nope=1", "--no-progress"])
    assert rc == 2 and "nope" in capsys.readouterr().err
    rc = cli_main(["transfer", str(src), "-o", str(tmp_path / "o.onnx"), "--attention", "softplus", "--steps", "5",
                   "--no-progress", "--report", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "o.onnx").exists() and (tmp_path / "r.json").exists()
    assert "cosine after" in capsys.readouterr().out


def test_model_fidelity_against_numpy(tiny_fx: LoadedModel) -> None:
    """The report's model fidelity (the original's outputs computed once, compared with the rewritten model's per
    batch): each output's cosine and relative error are numpy's, float64, averaged over the batches."""
    from passes.transfer.transfer import _model_fidelity
    rewritten = rewrite_with_params(tiny_fx, {}, attention="linear")
    batches = [{k: v.numpy() for k, v in tiny_fx.extra["hf"].make_inputs(3, 9 + s, seed=s).items()} for s in range(3)]
    got = _model_fidelity(tiny_fx, rewritten, batches)
    assert got["batches"] == 3
    for name in ("last_hidden_state", "pooler_output"):
        cos, rel = [], []
        for b in batches:
            r = run_model(tiny_fx, b)[name].astype(np.float64).ravel()
            c = run_model(rewritten, b)[name].astype(np.float64).ravel()
            cos.append(r @ c / (np.linalg.norm(r) * np.linalg.norm(c)))
            rel.append(np.linalg.norm(c - r) / np.linalg.norm(r))
        assert got["outputs"][name]["cosine"] == pytest.approx(float(np.mean(cos)), rel=1e-9)
        assert got["outputs"][name]["rel_error"] == pytest.approx(float(np.mean(rel)), rel=1e-9)
    assert got["min_cosine"] == min(o["cosine"] for o in got["outputs"].values())
    assert got["outputs"]["last_hidden_state"]["rel_error"] > 1e-5  # the swap changed the outputs (not vacuous)
