"""The calibration-corpus file cache (passes/transfer/corpus_cache.py): a second build is read from the file and
equals the first; a changed key, a damaged file or an unwritable folder lead to a rebuild, never to an error; and
the default calibration text goes through it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from passes.transfer import corpus_cache
from passes.transfer.corpus import Corpus

SAMPLE = Corpus(calibration=("First sentence here.", "Zweiter Satz mit Umlaut \u00e4."), held_out=("Held one.",),
                source="test source")


class _Builder:
    def __init__(self, corpus: Corpus = SAMPLE) -> None:
        self.calls = 0
        self.corpus = corpus

    def __call__(self) -> Corpus:
        self.calls += 1
        return self.corpus


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(corpus_cache.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(corpus_cache.ENV_SWITCH, raising=False)
    return tmp_path / "corpus"


def test_second_call_reads_the_file(cache: Path) -> None:
    build = _Builder()
    first = corpus_cache.cached_corpus("offline", build)
    files = list(cache.glob("offline-*.json"))
    assert len(files) == 1 and build.calls == 1
    assert json.loads(files[0].read_text())["calibration"] == list(SAMPLE.calibration)
    second = corpus_cache.cached_corpus("offline", build)
    assert build.calls == 1  # not rebuilt
    assert second == first == SAMPLE


def test_key_changes_rebuild(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _Builder()
    corpus_cache.cached_corpus("offline", build)
    key = corpus_cache.corpus_key("offline")
    assert corpus_cache.corpus_key("stdlib") != key
    monkeypatch.setattr(corpus_cache, "_distributions", lambda: [("somepkg", "9.9")])  # packages changed
    assert corpus_cache.corpus_key("offline") != key
    corpus_cache.cached_corpus("offline", build)
    assert build.calls == 2 and len(list(cache.glob("offline-*.json"))) == 2


@pytest.mark.parametrize("damage", ["not json", json.dumps({"format": "other"}),
                                    json.dumps({"format": corpus_cache.CACHE_FORMAT, "calibration": [1],
                                                "held_out": [], "source": "x"})])
def test_damaged_file_is_rebuilt(cache: Path, damage: str) -> None:
    build = _Builder()
    corpus_cache.cached_corpus("stdlib", build)
    (file,) = cache.glob("stdlib-*.json")
    file.write_text(damage)
    assert corpus_cache.cached_corpus("stdlib", build) == SAMPLE
    assert build.calls == 2
    assert json.loads(file.read_text())["calibration"] == list(SAMPLE.calibration)  # repaired


def test_unwritable_folder_and_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(corpus_cache.ENV_DIR, str(blocker))  # cache_dir() is below a file: cannot be created
    build = _Builder()
    assert corpus_cache.cached_corpus("offline", build) == SAMPLE
    assert corpus_cache.cached_corpus("offline", build) == SAMPLE and build.calls == 2
    monkeypatch.setenv(corpus_cache.ENV_DIR, str(tmp_path / "c"))
    monkeypatch.setenv(corpus_cache.ENV_SWITCH, "0")
    corpus_cache.cached_corpus("offline", build)
    assert build.calls == 3 and not (tmp_path / "c").exists()


def test_default_text_uses_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_calibration(data="offline") takes its lines from the cache file, not from a rebuild."""
    from passes.transfer import corpus as builder
    from passes.transfer import data as data_mod

    lines = tuple(f"Sentence number {i} is plain English text." for i in range(10))
    corpus_cache.cached_corpus("offline", _Builder(Corpus(calibration=lines, held_out=(), source="cached")))

    def boom() -> Corpus:
        raise AssertionError("the corpus was rebuilt instead of read from the cache")

    monkeypatch.setattr(builder, "offline_corpus", boom)
    seen: list[list[str]] = []
    monkeypatch.setattr(data_mod, "_from_lines", lambda got, *a, **k: seen.append(list(got)) or "calibration")
    assert data_mod.load_calibration(object(), "offline") == "calibration"  # type: ignore[arg-type]
    assert seen == [list(lines)]
