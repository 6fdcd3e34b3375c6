"""Outputs appear complete or not at all: an exception or Ctrl-C mid-write leaves nothing, a SIGKILL leaves at most a
hidden temporary (never at the output path) that the next run removes. The slow tests interrupt a real
``softswap convert`` of MiniLM in a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from rewrite import atomic


def test_exception_mid_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    for exc in (RuntimeError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic.atomic_output(target) as tmp:
                tmp.write_bytes(b"partial")
                raise exc
        assert list(tmp_path.iterdir()) == []


def test_previous_output_kept_when_a_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    atomic.write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_folder(target) as tmp:
            (tmp / "out.onnx").write_text("new, partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_file = tmp_path / f".out.onnx{atomic.TAG}{dead.pid}-abc123.onnx"
    stale_dir = tmp_path / f".out.onnx{atomic.TAG}{dead.pid}-xyz_9"
    stale_file.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "out.onnx").write_bytes(b"partial")
    mine = tmp_path / f".out.onnx{atomic.TAG}{os.getpid()}-live01.onnx"
    mine.write_bytes(b"in progress")
    unrelated = tmp_path / ".hidden-user-file"
    unrelated.write_text("keep")
    atomic.write_text(tmp_path / "r.json", "{}")  # any write into the folder cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, unrelated.name, "r.json"])


# --------------------------------------------------------------------------------------------------------------
def _minilm() -> Path:
    from rewrite.hf import HFLoadError, minilm_path
    try:
        return minilm_path()
    except HFLoadError as exc:
        pytest.skip(str(exc))


def _convert(out: Path) -> subprocess.Popen:
    env = dict(os.environ, TVM_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[2])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.Popen([sys.executable, "-m", "rewrite.cli", "convert", str(_minilm()), "-o", str(out),
                             "--attention", "linear", "--no-verify"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_when(proc: subprocess.Popen, folder: Path, sig: int, at: str, deadline_s: float = 300) -> str:
    """Send ``sig`` once the output's temporary appears (``at="write"``) or after ``at`` seconds; returns when."""
    start = time.time()
    while proc.poll() is None and time.time() - start < deadline_s:
        if at == "write":
            if any(atomic.TAG in p.name for p in folder.iterdir()):
                proc.send_signal(sig)
                return "during the write"
            time.sleep(0.005)
        elif time.time() - start >= float(at):
            proc.send_signal(sig)
            return f"after {at}s"
        else:
            time.sleep(0.05)
    return "never (the run had ended)"


def _complete_or_absent(out: Path) -> None:
    if out.exists():
        onnx.checker.check_model(str(out))  # complete: loads and checks


@pytest.mark.slow
@pytest.mark.parametrize("at", ["12", "write"])
def test_sigint_mid_convert_of_minilm(tmp_path: Path, at: str) -> None:
    out = tmp_path / "minilm.onnx"
    proc = _convert(out)
    when = _signal_when(proc, tmp_path, signal.SIGINT, at)
    print(f"SIGINT sent {when}")
    _, err = proc.communicate(timeout=600)
    _complete_or_absent(out)
    assert "Traceback" not in err
    if when.startswith("never"):
        assert proc.returncode == 0 and out.exists()
    else:
        assert proc.returncode == 130, (when, err[-2000:])
        assert [line for line in err.splitlines() if line.strip()] == ["softswap: interrupted; no output was written"]
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != out.name] == []  # no temporary left behind


@pytest.mark.slow
def test_sigkill_mid_write_of_minilm(tmp_path: Path) -> None:
    out = tmp_path / "minilm.onnx"
    proc = _convert(out)
    print(f"SIGKILL sent {_signal_when(proc, tmp_path, signal.SIGKILL, 'write')}")
    proc.communicate(timeout=600)
    _complete_or_absent(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name != out.name]
    assert all(p.name.startswith(f".{out.name}{atomic.TAG}") for p in leftovers)  # hidden, never the output
    atomic.clean_stale(tmp_path)  # what the next run into this folder does first
    assert [p.name for p in tmp_path.iterdir() if p.name != out.name] == []


def test_os_error_while_writing_names_the_output(tmp_path: Path) -> None:
    from rewrite.errors import OutputPathError
    target = tmp_path / "out.onnx"
    with pytest.raises(OutputPathError, match="out.onnx: cannot write the output"):
        with atomic.atomic_output(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
