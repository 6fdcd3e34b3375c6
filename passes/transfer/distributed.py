"""Attention transfer on several processes / machines with :mod:`torch.distributed`.

Sites are fitted independently (:mod:`.fit`: teacher forcing on each site's own captured values), so the work is
split **by site**: rank ``r`` of ``N`` owns a disjoint group of sites, balanced by learnable-parameter count
(:func:`partition`), captures only those sites' values on the calibration data (running its share of the batches
and exchanging values with the other ranks, :mod:`.capture_split`) and fits them; with more ranks than sites a
group of ranks fits each site together, data-parallel by rows (:mod:`.site_dp`). Every per-site fit
is a pure function of (seed, site index, step) — the batch order and the torch seed are derived from them, not from
the rank — so N ranks give the same parameters as 1 (bit-for-bit on CPU with one thread per rank and one rank per
site; a site fitted by a group of ranks takes the same steps up to float summation order).

Rank 0 gathers every rank's parameters and report rows (``gather_object``; gloo on CPU, nccl when asked for on GPU
hosts), then rewrites the model, measures the fitted model's fidelity and writes the output and the report, while
the last rank (:attr:`Shard.helper`) runs the untrained swap on the held-out batches (it does not depend on the
fit) and sends its outputs to rank 0 (``send_object_list``), which compares them with the original's; the other
ranks write nothing but their checkpoint shard. Checkpoints: rank ``r`` writes ``<checkpoint>.rank<r>``, keyed by
site (:mod:`.shards`); any world size resumes from any other's shards; rank 0 folds them into ``<checkpoint>`` at
the end.

Entry points:

- ``softswap transfer ... --nproc N`` launches N local ranks through :mod:`torch.distributed.run` (torchrun's own
  launcher, ``--standalone`` rendezvous on 127.0.0.1) and turns a failed rank into one :class:`RankFailedError`
  line naming the rank (:func:`launch`);
- under a user's own ``torchrun`` (any number of nodes) or SLURM ``srun`` the same command reads ``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` (or ``SLURM_PROCID``/``SLURM_NTASKS``) from the environment
  (:func:`shard_from_env`).

Test hook: ``SOFTSWAP_TEST_EXIT_RANK=r`` makes rank ``r`` exit (status 3) right after it has checkpointed its
first site, as a killed rank would.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from rewrite.errors import OptionError, SoftswapError

log = logging.getLogger(__name__)

#: Test hook: this rank exits (status 3) after checkpointing its first site.
ENV_EXIT_RANK = "SOFTSWAP_TEST_EXIT_RANK"
#: Set by :func:`launch`: ranks write their one-line softswap error here (``rank<r>.err``) instead of stderr.
ENV_ERROR_DIR = "SOFTSWAP_DIST_ERROR_DIR"
BACKENDS = ("auto", "gloo", "nccl")


class RankFailedError(SoftswapError):
    """A rank of a distributed transfer failed (names the rank and its exit status or error); nothing was written."""


class PeerLostError(RankFailedError):
    """This rank (``.rank``) lost contact with another rank inside a collective (the other rank died or hung)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def peer_lost(rank: int, doing: str, exc: BaseException) -> PeerLostError:
    """The error of rank ``rank`` whose collective failed with ``exc`` (gloo/nccl: a peer closed its connection or
    the timeout passed) while ``doing`` something: one line, ``rank <r>: lost contact with another rank while ...``."""
    from rewrite.errors import first_line
    return PeerLostError(f"rank {rank}: lost contact with another rank while {doing} ({first_line(exc)[:200]}); "
                         "nothing was written", rank=rank)


@contextmanager
def collective(rank: int, doing: str) -> Iterator[None]:
    """Run collectives of rank ``rank`` inside the block; a gloo/nccl failure (``RuntimeError``: a peer closed its
    connection, the timeout passed) becomes :func:`peer_lost`'s error for ``doing``."""
    try:
        yield
    except RuntimeError as exc:
        raise peer_lost(rank, doing, exc) from None


# ------------------------------------------------------------------------------------------------------------
def partition(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Split items with costs ``sizes`` into ``world`` groups of near-equal total cost (longest-processing-time
    greedy: largest first, onto the least-loaded group, ties to the lowest rank). Returns item indices per group,
    each in ascending order. Deterministic. Zero-cost items count as 1 so they spread too."""
    if world < 1:
        raise OptionError(f"world size must be >= 1, got {world}")
    loads = [0] * world
    groups: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda j: (-max(int(sizes[j]), 1), j)):
        r = min(range(world), key=lambda k: (loads[k], k))
        groups[r].append(i)
        loads[r] += max(int(sizes[i]), 1)
    return [sorted(g) for g in groups]


@dataclass
class Shard:
    """This process's place in a distributed transfer (``rank`` of ``world``); passed to
    :func:`passes.transfer.transfer` as ``shard=``. ``group`` is a torch process group (None when ``world`` is 1)."""

    rank: int
    world: int
    group: Any = None
    backend: str = "gloo"
    assignment: dict[int, list[str]] = field(default_factory=dict)
    #: every rank (not only rank 0) receives all params in :meth:`gather` (set when stage 2 runs data-parallel)
    gather_to_all: bool = False
    #: how the capture went (set by the transfer): ``split`` over the ranks (:mod:`.capture_split`; ``batches_run``
    #: by this rank of ``batches``) or not (``why``)
    capture: dict[str, Any] = field(default_factory=dict)
    #: the ranks that fit each site (one each, or a group when there are more ranks than sites: :mod:`.site_dp`)
    site_ranks: dict[str, list[int]] = field(default_factory=dict)
    #: this rank's place in the groups of the sites it fits with other ranks
    splits: dict[str, Any] = field(default_factory=dict)
    _done: int = 0

    @property
    def writes(self) -> bool:
        """Whether this rank writes the output and report (rank 0)."""
        return self.rank == 0

    def select(self, sites: Sequence[Any], sizes: Sequence[int]) -> list[Any]:
        """This rank's sites among ``sites`` (each with parameter count ``sizes[i]``), in their original order.

        With more ranks than sites every site gets a group of ranks that fit it together, data-parallel by rows
        (:mod:`.site_dp`; :meth:`split_for` gives this rank's place); every rank must call this (the groups are
        torch process groups, created collectively)."""
        from .site_dp import SiteSplit, site_groups
        groups = site_groups([s.name for s in sites], self.world)
        if groups:
            self.site_ranks = groups
            self.assignment = {r: [n for n, rs in groups.items() if r in rs] for r in range(self.world)}
            for name, ranks in groups.items():  # collective: same order on every rank
                group = self._new_group(ranks) if len(ranks) > 1 else None
                if self.rank in ranks and group is not None:
                    self.splits[name] = SiteSplit(member=ranks.index(self.rank), members=len(ranks), group=group,
                                                  rank=self.rank)
        else:
            parts = partition(sizes, self.world)
            self.assignment = {r: [sites[i].name for i in g] for r, g in enumerate(parts)}
            self.site_ranks = {n: [r] for r, names in self.assignment.items() for n in names}
        mine = [s for s in sites if s.name in self.assignment[self.rank]]
        log.info("rank %d/%d fits %s%s", self.rank, self.world, [s.name for s in mine],
                 " (data-parallel with the other ranks of its site's group)" if self.splits else "")
        return mine

    def _new_group(self, ranks: list[int]) -> Any:
        """A gloo process group of ``ranks`` (the site fits, and so their gradients, are on CPU also when the
        transfer's group is nccl)."""
        import torch.distributed as dist
        try:
            return dist.new_group(ranks=ranks, backend="gloo")
        except RuntimeError as exc:
            self._lost(exc, "forming a site's group of ranks")

    def split_for(self, site: str) -> Any:
        """This rank's :class:`.site_dp.SiteSplit` for ``site`` when a group of ranks fits it together, else None."""
        return self.splits.get(site)

    def checkpoint_path(self, path: str | os.PathLike[str]) -> Path:
        """Where this rank writes its checkpoint: its own shard (a single process writes ``path`` itself)."""
        from .shards import shard_path
        return Path(path) if self.world == 1 else shard_path(path, self.rank)

    def site_done(self, name: str) -> None:
        """Called after a site is fitted and checkpointed (the test hook's exit point)."""
        self._done += 1
        if self._done == 1 and os.environ.get(ENV_EXIT_RANK) == str(self.rank):
            log.warning("rank %d: exiting after %s (%s is set)", self.rank, name, ENV_EXIT_RANK)
            os._exit(3)

    def gather(self, fitted: Mapping[str, Any], rows: Mapping[str, Any], order: Sequence[str]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0 (every rank with :attr:`gather_to_all`): every rank's (params, report rows) merged in site
        ``order``; other ranks: empty dicts."""
        parts = [(dict(fitted), dict(rows))]
        if self.world > 1:
            import torch.distributed as dist
            everyone = self.gather_to_all
            received: list[Any] | None = [None] * self.world if self.rank == 0 or everyone else None
            try:
                if everyone:
                    dist.all_gather_object(received, parts[0], group=self.group)
                else:
                    dist.gather_object(parts[0], received, dst=0, group=self.group)
            except RuntimeError as exc:  # gloo/nccl: a peer closed its connection or the timeout passed
                self._lost(exc, "gathering the fitted params")
            if self.rank != 0 and not everyone:
                return {}, {}
            parts = received  # type: ignore[assignment]
        all_fitted: dict[str, Any] = {}
        all_rows: dict[str, Any] = {}
        for f, r in parts:
            all_fitted.update(f)
            all_rows.update(r)
        missing = [n for n in order if n not in all_fitted]
        if missing:
            raise RankFailedError(f"distributed transfer: no rank returned site(s) {missing}")
        return {n: all_fitted[n] for n in order}, {n: all_rows[n] for n in order}

    @property
    def helper(self) -> int:
        """The rank that runs the untrained swap on the held-out batches (its outputs go to rank 0, which measures
        that swap's model fidelity) while rank 0 rewrites, measures the fitted model and exports (the last rank;
        rank 0 itself in a one-process run). That work does not depend on the fit, so it overlaps rank 0's tail instead of following it."""
        return self.world - 1

    def send_to_root(self, obj: Any) -> None:
        """Send a picklable ``obj`` to rank 0 (point to point; rank 0 takes it with :meth:`receive_from_helper`)."""
        import torch.distributed as dist
        try:
            dist.send_object_list([obj], dst=0, group=self.group)
        except RuntimeError as exc:
            self._lost(exc, "sending the untrained swap's outputs")

    def receive_from_helper(self) -> Any:
        """Rank 0: the object the :attr:`helper` rank sent with :meth:`send_to_root`."""
        import torch.distributed as dist
        box: list[Any] = [None]
        try:
            dist.recv_object_list(box, src=self.helper, group=self.group)
        except RuntimeError as exc:
            self._lost(exc, "receiving the untrained swap's outputs")
        return box[0]

    def _lost(self, exc: BaseException, doing: str) -> None:
        raise peer_lost(self.rank, doing, exc) from None

    def describe(self) -> dict[str, Any]:
        """JSON-able: world size, backend, which rank fitted which sites."""
        return {"world_size": self.world, "backend": self.backend,
                "assignment": {str(r): names for r, names in self.assignment.items()}, "capture": self.capture,
                "data_parallel_sites": {n: rs for n, rs in self.site_ranks.items() if len(rs) > 1}}

    def close(self) -> None:
        if self.group is not None:
            import torch.distributed as dist
            try:
                dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - shutting down after the work is done
                log.debug("destroy_process_group: %s", exc)
            self.group = None


# ------------------------------------------------------------------------------------------------------------
def launched_env() -> dict[str, str] | None:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` of this process when a launcher (torchrun, SLURM) started it as one
    rank of several; None otherwise. SLURM's ``SLURM_PROCID``/``SLURM_NTASKS`` count when ``MASTER_ADDR`` is set."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"], "LOCAL_RANK": env.get("LOCAL_RANK", "0")}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    return None


def shard_from_env(backend: str = "auto", timeout_s: float = 1800.0) -> Shard | None:
    """Join the process group this process was launched into; None when not launched as a rank (or world 1).

    ``backend``: ``gloo`` (CPU), ``nccl`` (GPU hosts; each rank on ``cuda:LOCAL_RANK``) or ``auto`` (gloo: the
    site fits run on CPU). ``timeout_s`` bounds every collective (a rank that never arrives).
    """
    ids = launched_env()
    if ids is None:
        return None
    try:
        rank, world, local = int(ids["RANK"]), int(ids["WORLD_SIZE"]), int(ids["LOCAL_RANK"])
    except ValueError:
        raise OptionError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {ids}") from None
    if not 0 <= rank < world:
        raise OptionError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if backend not in BACKENDS:
        raise OptionError(f"--dist-backend {backend!r}: known: {', '.join(BACKENDS)}")
    if world == 1:
        return Shard(rank=0, world=1)
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise OptionError(f"rank {rank} of {world}: MASTER_ADDR and MASTER_PORT must be set (torchrun sets them; "
                          "under SLURM export the first node's address and a free port)")
    import torch
    import torch.distributed as dist
    chosen = "gloo" if backend == "auto" else backend
    if chosen == "nccl":
        if not torch.cuda.is_available():
            raise OptionError("--dist-backend nccl needs CUDA; use gloo on CPU hosts")
        torch.cuda.set_device(local)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    # the store or gloo fails when a rank never joins (timeout) or dies while connecting
    with collective(rank, f"joining the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"):
        dist.init_process_group(chosen, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return Shard(rank=rank, world=world, group=dist.group.WORLD, backend=chosen)


def report_rank_error(shard_rank: int | None, message: str, lost: bool = False) -> bool:
    """In a rank started by :func:`launch`: write the one-line error for the launcher (``rank<r>.err``, or
    ``rank<r>.lost`` when the rank only lost a peer) and return True (the caller prints nothing); elsewhere False."""
    folder = os.environ.get(ENV_ERROR_DIR)
    if not folder or shard_rank is None:
        return False
    try:
        Path(folder, f"rank{shard_rank}.{'lost' if lost else 'err'}").write_text(message)
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------------------------------------
def launch(child_argv: Sequence[str], nproc: int, verbose: bool = False) -> int:
    """Run the ``softswap`` command ``<child_argv>`` as ``nproc`` local ranks through :mod:`torch.distributed.run`
    (``--standalone``, no restarts; on Linux each rank is a fork of this process, :data:`_FORK`, else
    ``python -m rewrite.cli``). Returns 0 when every rank succeeded.

    Raises :class:`RankFailedError` naming the first failed rank (its one-line softswap error when it had one, else
    its exit status or signal); the launcher kills the other ranks, so rank 0 never writes the output.
    """
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise OptionError(f"--nproc must be an integer >= 1, got {nproc!r}")
    quiet = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.distributed.run",
                                            "torch.distributed.launcher")]
    levels = [lg.level for lg in quiet]
    if not verbose:
        for lg in quiet:
            lg.setLevel(logging.CRITICAL)
    previous = os.environ.get(ENV_ERROR_DIR)
    with tempfile.TemporaryDirectory(prefix="softswap-ranks-") as errors:
        os.environ[ENV_ERROR_DIR] = errors
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun would set it and warn
        try:
            # what `torchrun --standalone` does (torch.distributed.run.run): c10d rendezvous on a free local port
            targs = get_args_parser().parse_args([f"--nproc-per-node={nproc}", "--max-restarts=0",
                                                  "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
                                                  f"--rdzv-id={uuid.uuid4()}", "--monitor-interval=0.1",
                                                  "-m", "rewrite.cli", *child_argv])
            config, cmd, cmd_args = config_from_args(targs)
            if _FORK:  # the ranks start as forks of this process: no second Python start and import of softswap
                config.start_method = "fork"
                elastic_launch(config, _rank_main)(list(child_argv))
            else:
                elastic_launch(config, cmd)(*cmd_args)
            return 0
        except ChildFailedError as exc:
            raise RankFailedError(_failure_line(exc, Path(errors))) from None
        finally:
            if previous is None:
                os.environ.pop(ENV_ERROR_DIR, None)
            else:
                os.environ[ENV_ERROR_DIR] = previous
            for lg, lvl in zip(quiet, levels):
                lg.setLevel(lvl)


#: Start the ranks by ``fork`` where the platform has it (Linux): each rank inherits this process's imports (torch,
#: onnx, softswap: ~2.3 s of a fresh process's start on a quiet core) instead of re-importing them after the
#: parent did, which was the serial launcher cost of ``--nproc``. Else ``python -m rewrite.cli`` per rank.
_FORK = hasattr(os, "fork") and sys.platform.startswith("linux")


def _rank_main(argv: list[str]) -> None:
    """One rank's entry in a forked child: the ``softswap`` command on ``argv`` (the launcher set ``RANK`` etc. in
    the environment). A nonzero status becomes the process's exit status (as ``python -m rewrite.cli`` would)."""
    import signal
    # the launcher's agent turns SIGTERM/SIGINT/SIGHUP/SIGQUIT into exceptions in this (its own) process; a forked
    # rank must die of them as a fresh process would (the agent stops the others with SIGTERM when one fails)
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    from rewrite.cli import main
    status = main(argv)
    if status:
        raise SystemExit(status)


def _failure_line(exc: Any, errors: Path) -> str:
    """One line for a ChildFailedError naming the rank that caused it: a rank's softswap error (``.err``) first;
    else a rank that exited on its own (status > 0) without merely losing a peer (``.lost``); else one killed by a
    signal; else one that lost a peer."""
    failures = dict(getattr(exc, "failures", {}) or {})
    # every rank's own error counts, also one the launcher did not list (forked ranks are reported one at a time)
    for file in sorted(errors.glob("rank*.err"), key=lambda f: int(f.stem[4:]) if f.stem[4:].isdigit() else 1 << 30):
        return f"rank {file.stem[4:]}: {file.read_text().strip()}"
    if not failures:
        return "distributed transfer failed (no rank reported why); nothing was written"

    def blame(r: int) -> tuple[int, int]:
        lost = (errors / f"rank{r}.lost").exists()
        code = failures[r].exitcode
        return (2 if lost else 0 if code is not None and code > 0 else 1, r)

    rank = min(failures, key=blame)
    f = failures[rank]
    lost = errors / f"rank{rank}.lost"
    if lost.exists():  # no rank that really failed was seen (it outlived the linger): say what this one saw
        return lost.read_text().strip()  # "rank <r>: lost contact with another rank while ..."
    how = f"killed by signal {f.signal_name()}" if f.exitcode is not None and f.exitcode < 0 \
        else f"exited with status {f.exitcode}"
    return (f"rank {rank} {how} before the transfer finished; nothing was written (checkpoint shards, if any, "
            "are kept and resume with any --nproc)")


def child_argv(args: Any, parser: Any, drop: Sequence[str] = ("nproc",)) -> list[str]:
    """Rebuild a ``transfer`` command line from parsed ``args`` for the ranks (``parser``: the subcommand's
    parser; options equal to their defaults and those in ``drop`` are left out; global flags are kept)."""
    out = ["transfer"]
    for flag in ("verbose", "debug", "trust_remote_code"):
        if getattr(args, flag, False):
            out.insert(0, "--" + flag.replace("_", "-"))
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "verbose", "debug", "trust_remote_code", *drop) or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if not action.option_strings:
            out.append(str(value))
            continue
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true
            if value is True:
                out.append(flag)
        elif isinstance(value, list):
            for item in value:
                out += [flag, str(item)]
        else:
            out += [flag, str(value)]
    return out


#: Seconds a rank that merely lost a peer waits before it exits under :func:`launch`. The launcher stops the
#: other ranks as soon as it sees one fail and names the rank it saw; forked ranks are reported one at a time, so
#: a rank exiting right after its peer died could be the one seen first and blamed. Lingering lets the launcher
#: see the rank that really failed (and SIGTERM this one); only failed runs wait.
LOST_PEER_LINGER_S = 10.0


def main_rank(run: Any, backend: str = "auto") -> Any:
    """Run ``run(shard)`` as a rank of the launched group (``shard`` None when not launched), closing the group
    afterwards. A softswap error in a rank started by :func:`launch` is handed to the launcher (one line there)."""
    shard = None
    try:
        shard = shard_from_env(backend)
        return run(shard)
    except SoftswapError as exc:
        lost = isinstance(exc, PeerLostError)
        rank = shard.rank if shard is not None else getattr(exc, "rank", None)  # None: joining failed
        if rank is not None and (shard is None or shard.world > 1) and report_rank_error(
                rank, str(exc).splitlines()[0], lost=lost):
            if lost:  # let the launcher see the rank that really failed first; it stops this one (SIGTERM)
                import time
                time.sleep(LOST_PEER_LINGER_S)
            sys.exit(2)
        raise
    except Exception as exc:  # noqa: BLE001 - a bug in one rank: one line at the launcher, not one per rank
        from rewrite.errors import first_line
        if shard is not None and shard.world > 1 and report_rank_error(
                shard.rank, f"{first_line(exc)} (unexpected; rerun without --nproc and with --debug for the traceback)"):
            sys.exit(1)
        raise
    finally:
        if shard is not None:
            shard.close()
