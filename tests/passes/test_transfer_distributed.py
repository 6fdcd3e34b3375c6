"""Distributed attention transfer (passes/transfer/distributed.py) on the tiny BERT, as an ONNX file, with gloo ranks
on 127.0.0.1 launched by ``softswap transfer --nproc N`` (torch.distributed.run).

Reference: the same command in one process. Asserted: 2 ranks give the same params (1e-6), the same report rows and
the same model fidelity before (measured on rank 1) and after (rank 0);
a rank that dies mid-run gives one error line naming it, a non-zero status, no output or report, and checkpoint
shards from which a 1-process run resumes to the same params; the site partition covers every site once, balanced.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from passes.transfer import load_checkpoint_params  # noqa: E402
from passes.transfer.distributed import ENV_EXIT_RANK, partition  # noqa: E402
from passes.transfer.transfer import _read_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transfer_models import tiny_bert_onnx_with_calibration  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--attention", "mala", "--batch-size", "4", "--steps", "12", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_bert_onnx_with_calibration(tmp_path_factory.mktemp("dist"))


def _softswap(args: list[str], env: dict[str, str] | None = None, timeout: float = 600
              ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rewrite.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)


def _run(model: Path, data: Path, out: Path, tag: str, extra: list[str] = (), env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return _softswap(["transfer", str(model), "-o", str(out / f"{tag}.onnx"), "--data", str(data), *ARGS,
                      "--checkpoint", str(out / f"{tag}.pt"), "--report", str(out / f"{tag}.json"), *extra], env)


def _rows(report: dict) -> dict:
    return {name: {k: v for k, v in row.items() if k != "seconds"} for name, row in report["sites"].items()}


@pytest.fixture(scope="module")
def one_rank(model_and_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one")
    proc = _run(*model_and_data, out, "r1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_partition_covers_and_balances() -> None:
    rng = np.random.default_rng(0)
    for world in (1, 2, 3, 5):
        sizes = [int(x) for x in rng.integers(0, 1000, size=11)]
        groups = partition(sizes, world)
        assert sorted(i for g in groups for i in g) == list(range(11))
        loads = [sum(max(sizes[i], 1) for i in g) for g in groups]
        assert max(loads) - min(loads) <= max(max(s, 1) for s in sizes)  # the greedy (LPT) bound
        assert groups == partition(sizes, world)
    assert partition([512, 512, 512, 512, 512, 512], 2) == [[0, 2, 4], [1, 3, 5]]
    assert partition([10, 1, 1, 8], 2) == [[0], [1, 2, 3]]


def test_two_ranks_equal_one_rank(model_and_data: tuple[Path, Path], one_rank: Path, tmp_path: Path) -> None:
    proc = _run(*model_and_data, tmp_path, "r2", ["--nproc", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r2.onnx").exists()
    assert not list(tmp_path.glob("r2.pt.rank*")), "the shards were not folded into the checkpoint"
    p1, p2 = load_checkpoint_params(one_rank / "r1.pt"), load_checkpoint_params(tmp_path / "r2.pt")
    assert sorted(p1) == sorted(p2) == ["attn0", "attn1"]
    for site in p1:
        assert sorted(p1[site]) == sorted(p2[site])
        for k in p1[site]:
            torch.testing.assert_close(p2[site][k], p1[site][k], rtol=0, atol=1e-6)
    r1 = json.loads((one_rank / "r1.json").read_text())
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert _rows(r2) == _rows(r1)
    for name, after in r1["model_fidelity"]["after"]["outputs"].items():
        assert r2["model_fidelity"]["after"]["outputs"][name] == pytest.approx(after, rel=1e-6)
    # the untrained swap's fidelity is measured on rank 1 (beside rank 0's rewrite and export): same numbers
    for name, before in r1["model_fidelity"]["before"]["outputs"].items():
        assert r2["model_fidelity"]["before"]["outputs"][name] == pytest.approx(before, rel=1e-6)
    assert r2["model_fidelity"]["before"]["batches"] == r1["model_fidelity"]["before"]["batches"] > 0
    for report in (r1, r2):  # wall time per phase, rank 0's view
        assert {"load", "calibration", "capture", "fit", "rewrite", "model_fidelity", "export"} <= set(report["phases"])
    assert "gather" in r2["phases"] and "gather" not in r1["phases"]
    assert r2["distributed"]["world_size"] == 2
    assert sorted(sum(r2["distributed"]["assignment"].values(), [])) == ["attn0", "attn1"]
    capture = r2["distributed"]["capture"]  # each rank ran part of the batches (.capture_split), same params above
    assert capture["split"] and 0 < capture["batches_run"] < capture["batches"], capture


def test_killed_rank_then_resume_with_one(model_and_data: tuple[Path, Path], one_rank: Path, tmp_path: Path) -> None:
    proc = _run(*model_and_data, tmp_path, "k", ["--nproc", "2"], env={ENV_EXIT_RANK: "1"})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(err) == 1 and "rank 1" in err[0], proc.stderr[-2000:]
    assert not (tmp_path / "k.onnx").exists() and not (tmp_path / "k.json").exists()
    shard = tmp_path / "k.pt.rank1"
    assert shard.exists()
    saved = _read_checkpoint(shard)["sites"]
    assert saved["attn1"]["step"] == 12  # rank 1's site, finished and checkpointed before it died
    proc = _run(*model_and_data, tmp_path, "k")  # resume in one process from the 2-rank shards
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp_path.glob("k.pt.rank*"))
    p1, pk = load_checkpoint_params(one_rank / "r1.pt"), load_checkpoint_params(tmp_path / "k.pt")
    for site in p1:
        for k in p1[site]:
            torch.testing.assert_close(pk[site][k], p1[site][k], rtol=0, atol=1e-6)
    assert _rows(json.loads((tmp_path / "k.json").read_text())) == _rows(json.loads((one_rank / "r1.json").read_text()))


def test_bad_nproc(model_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from passes.transfer.cli import main as cli_main
    model, data = model_and_data
    for bad, word in ((["--nproc", "0"], "--nproc"), (["--max-memory", "lots"], "--max-memory")):
        rc = cli_main(["transfer", str(model), "-o", str(tmp_path / "o.onnx"), "--data", str(data), *ARGS, *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and word in err[0], err
        assert not (tmp_path / "o.onnx").exists()


def test_rank_error_is_one_line(model_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    """A softswap error inside the (forked) ranks: one line naming a rank, status 2, nothing written — and no
    second line from a rank the launcher stopped with SIGTERM (forked ranks must not inherit the agent's handlers)."""
    from passes.transfer import distributed
    model, _ = model_and_data
    proc = _run(model, tmp_path / "missing.npz", tmp_path, "e", ["--nproc", "2"])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("softswap: error: rank ") and "missing.npz" in err[0], err
    assert "Signal" not in proc.stderr
    assert not (tmp_path / "e.onnx").exists() and not (tmp_path / "e.json").exists()
    assert distributed._FORK == sys.platform.startswith("linux")


def test_forked_rank_dies_of_sigterm(capsys: pytest.CaptureFixture[str]) -> None:
    """The launcher's agent raises on SIGTERM in its own process; a rank forked from it resets that, so the agent's
    SIGTERM (stopping the other ranks after one failed) kills it instead of surfacing as a second error."""
    import signal

    from passes.transfer.distributed import _rank_main

    def agent_handler(signum: int, frame: object) -> None:
        raise RuntimeError("agent handler")

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for s in saved:
            signal.signal(s, agent_handler)
        _rank_main(["transfer", "--help"])  # status 0: returns
        assert all(signal.getsignal(s) == signal.SIG_DFL for s in saved)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert "--nproc" in capsys.readouterr().out


class _Failure:
    def __init__(self, exitcode: int) -> None:
        self.exitcode = exitcode

    def signal_name(self) -> str:
        return "SIGTERM"


class _Failed:
    def __init__(self, failures: dict[int, _Failure]) -> None:
        self.failures = failures


def test_failure_line_prefers_the_rank_that_really_failed(tmp_path: Path) -> None:
    """Forked ranks are reported one at a time: the launcher may list only a rank that merely lost its peer. A
    rank's own error file wins even when the launcher did not list that rank; a rank listed as exited on its own
    (status > 0, no .lost) wins over one that lost a peer; a lone lost rank says what it saw."""
    from passes.transfer.distributed import _failure_line
    (tmp_path / "rank0.lost").write_text("rank 0: lost contact with another rank during stage 2 (x); nothing was written")
    line = _failure_line(_Failed({0: _Failure(2)}), tmp_path)
    assert line.startswith("rank 0: lost contact with another rank during stage 2"), line
    assert "rank 1 exited with status 3" in _failure_line(_Failed({0: _Failure(2), 1: _Failure(3)}), tmp_path)
    (tmp_path / "rank1.err").write_text("bad.npz: not a calibration file")
    assert _failure_line(_Failed({0: _Failure(2)}), tmp_path) == "rank 1: bad.npz: not a calibration file"


def test_a_rank_that_lost_its_peer_lingers_before_exiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the launcher a rank that only lost a peer writes ``.lost`` and waits LOST_PEER_LINGER_S before it
    exits (status 2), so the launcher sees the rank that died first; any other error exits at once."""
    from passes.transfer import distributed
    from passes.transfer.distributed import ENV_ERROR_DIR, PeerLostError, Shard
    slept: list[float] = []
    monkeypatch.setattr(distributed, "shard_from_env", lambda backend="auto": Shard(rank=0, world=2))
    monkeypatch.setattr("time.sleep", slept.append)
    monkeypatch.setenv(ENV_ERROR_DIR, str(tmp_path))

    def lose(shard: Shard) -> None:
        raise PeerLostError("rank 0: lost contact with another rank while gathering the fitted params (x)")

    with pytest.raises(SystemExit) as exc:
        distributed.main_rank(lose)
    assert exc.value.code == 2 and slept == [distributed.LOST_PEER_LINGER_S] and slept[0] >= 5
    assert (tmp_path / "rank0.lost").read_text().startswith("rank 0: lost contact")

    def bad(shard: Shard) -> None:
        raise distributed.OptionError("--max-memory: bad")

    slept.clear()
    with pytest.raises(SystemExit) as exc:
        distributed.main_rank(bad)
    assert exc.value.code == 2 and slept == [] and (tmp_path / "rank0.err").read_text() == "--max-memory: bad"


def test_a_rank_whose_peer_never_joins_is_a_lost_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 of 2 started alone (the other node never came up): joining the group times out as a PeerLostError
    naming the rank and where it waited, not torch's DistStoreError; under the launcher it is reported as a lost
    peer (``.lost``, linger, status 2), so the launcher names the rank that never arrived."""
    import socket

    from passes.transfer import distributed
    from passes.transfer.distributed import ENV_ERROR_DIR, PeerLostError
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in ("SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(port))):
        monkeypatch.setenv(name, value)
    with pytest.raises(PeerLostError) as exc:
        distributed.shard_from_env("gloo", timeout_s=2)
    assert str(exc.value).startswith(f"rank 0: lost contact with another rank while joining the process group at "
                                     f"127.0.0.1:{port} ("), str(exc.value)
    assert "1/2" in str(exc.value)  # torch's own count of who joined is kept in the line
    assert not torch.distributed.is_initialized()

    slept: list[float] = []
    monkeypatch.setattr(distributed, "shard_from_env",
                        lambda backend="auto": (_ for _ in ()).throw(exc.value))  # the same failure, instantly
    monkeypatch.setattr("time.sleep", slept.append)
    monkeypatch.setenv(ENV_ERROR_DIR, str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        distributed.main_rank(lambda shard: pytest.fail("run() must not be reached"))
    assert stop.value.code == 2 and slept == [distributed.LOST_PEER_LINGER_S]
    assert (tmp_path / "rank0.lost").read_text() == str(exc.value)


def test_launched_env_reads_torchrun_then_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's RANK/WORLD_SIZE win; SLURM's SLURM_PROCID/SLURM_NTASKS count only with MASTER_ADDR set (srun
    alone does not say where rank 0 listens); neither: not launched."""
    from passes.transfer.distributed import launched_env
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert launched_env() is None
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launched_env() is None
    monkeypatch.setenv("MASTER_ADDR", "node0")
    assert launched_env() == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_env() == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


def test_own_slurm_style_launch_equals_one_rank(model_and_data: tuple[Path, Path], one_rank: Path,
                                                 tmp_path: Path) -> None:
    """The entry point under a user's own launcher: two plain ``softswap transfer`` processes with SLURM's
    variables (as ``srun`` sets them) and MASTER_ADDR/MASTER_PORT, no ``--nproc``. Rank 0 writes the output and a
    report with the one-process params and rows; rank 1 writes nothing and prints nothing."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model, data = model_and_data
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SLURM_NTASKS": "2"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "rewrite.cli", "transfer", str(model), "-o", str(tmp_path / "s.onnx"), "--data",
           str(data), *ARGS, "--checkpoint", str(tmp_path / "s.pt"), "--report", str(tmp_path / "s.json")]
    procs = [subprocess.Popen(cmd, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert outs[1][0].strip() == ""  # only rank 0 prints the report
    r1 = json.loads((one_rank / "r1.json").read_text())
    rs = json.loads((tmp_path / "s.json").read_text())
    assert _rows(rs) == _rows(r1) and rs["distributed"]["world_size"] == 2
    p1, ps = load_checkpoint_params(one_rank / "r1.pt"), load_checkpoint_params(tmp_path / "s.pt")
    for site in p1:
        for k in p1[site]:
            torch.testing.assert_close(ps[site][k], p1[site][k], rtol=0, atol=1e-6)
    assert (tmp_path / "s.onnx").exists() and not list(tmp_path.glob("s.pt.rank*"))
