"""Remote measurement for MetaSchedule tuning: RPC workers registered with a TVM tracker.

``softswap compile --tune N --rpc HOST:PORT --device-key KEY`` builds candidates in this process (the same
in-process builder as local tuning) and measures them on the RPC servers that registered with the tracker at
``HOST:PORT`` under ``KEY`` (``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``).  The database, its
location and the selection of records against the hand rules are those of local tuning (:mod:`targets.tuning`);
the selection times both schedules on a worker too, so a record is applied only where it wins on the device.

Contracts:

* :func:`check_tracker` is called before any work: an unreachable tracker (connection and reply bounded by
  ``RemoteDevice.connect_timeout_s`` seconds) or a tracker with no server under the key is a one-line
  :class:`~targets.errors.RemoteTuningError` naming ``HOST:PORT`` and the key.
* :func:`make_runner` returns MetaSchedule's ``RPCRunner`` with one connection per registered server, and a
  per-candidate time limit (``RemoteDevice.session_timeout_s`` seconds) on the pool running the connections:
  TVM 0.27's ``RPCRunner`` creates its pool without one, so a worker that hangs (or a request the tracker can never
  serve because every server under the key is gone) would block tuning forever.  With it, a worker that dies
  mid-run costs only the candidates it held: they come back as failed results (MetaSchedule stores them with
  cost 1e10) and the tracker hands the following candidates to the remaining servers.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import InputError, RemoteTuningError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteDevice:
    """Where candidates are measured: a TVM RPC tracker and the key its servers registered under.

    connect_timeout_s: seconds allowed to connect to the tracker and read its reply (the pre-flight check).
    session_timeout_s: seconds one candidate's measurement (session request, upload, run) may take on a worker.
    """

    host: str
    port: int
    key: str
    connect_timeout_s: float = 5.0
    session_timeout_s: float = 60.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_rpc(address: str, key: str | None) -> RemoteDevice:
    """``HOST:PORT`` and a device key as a :class:`RemoteDevice`; raises :class:`InputError` naming the flag."""
    host, sep, port = (address or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--rpc {address!r}: expected HOST:PORT of a TVM RPC tracker", culprit="--rpc")
    if not key or not key.strip():
        raise InputError("--rpc needs --device-key KEY (the key the RPC servers registered with)",
                         culprit="--device-key")
    return RemoteDevice(host.strip("[]"), int(port), key.strip())


def tracker_summary(device: RemoteDevice) -> dict[str, Any]:
    """The tracker's summary (``{"queue_info": ..., "server_info": [...]}``), read over a socket bounded by
    ``device.connect_timeout_s``; raises :class:`RemoteTuningError` when the tracker cannot be reached or does not
    answer as one."""
    from tvm.rpc import base

    try:
        with socket.create_connection((device.host, device.port), timeout=device.connect_timeout_s) as sock:
            sock.settimeout(device.connect_timeout_s)
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                raise RemoteTuningError(f"{device.address} is not a TVM RPC tracker (key {device.key})",
                                        culprit=device.address)
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            reply = base.recvjson(sock)
    except RemoteTuningError:
        raise
    except (OSError, RuntimeError, ValueError, struct.error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RemoteTuningError(f"RPC tracker {device.address} unreachable for device key {device.key!r} ({reason}); "
                                f"start it with python -m tvm.exec.rpc_tracker --port {device.port}",
                                culprit=device.address) from None
    if not isinstance(reply, list) or not reply or reply[0] != base.TrackerCode.SUCCESS:
        raise RemoteTuningError(f"RPC tracker {device.address} gave no summary (key {device.key})",
                                culprit=device.address)
    return reply[1]


def count_workers(summary: dict[str, Any], key: str) -> int:
    """Servers registered under ``key`` in a tracker summary (free or busy)."""
    n = 0
    for item in summary.get("server_info", []):
        _, _, item_key = str(item.get("key", "")).partition(":")
        n += item_key == key
    return n


def check_tracker(device: RemoteDevice) -> int:
    """The number of servers registered under ``device.key``; raises :class:`RemoteTuningError` (one line naming
    HOST:PORT and the key) when the tracker is unreachable or has no such server."""
    n = count_workers(tracker_summary(device), device.key)
    if n == 0:
        raise RemoteTuningError(f"RPC tracker {device.address} has no server with device key {device.key!r}; start "
                                f"one with python -m tvm.exec.rpc_server --tracker {device.address} "
                                f"--key {device.key}", culprit=device.address)
    log.info("RPC tracker %s: %d server(s) with key %s", device.address, n, device.key)
    return n


def make_runner(device: RemoteDevice, n_workers: int, evaluator_config: Any):
    """MetaSchedule's ``RPCRunner`` measuring on ``n_workers`` servers in parallel, each candidate bounded by
    ``device.session_timeout_s`` (see the module docstring)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.support.popen_pool import PopenPoolExecutor

    config = ms.runner.RPCConfig(tracker_host=device.host, tracker_port=device.port, tracker_key=device.key,
                                 session_priority=1, session_timeout_sec=int(max(1, device.session_timeout_s)))
    runner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator_config, max_workers=n_workers)
    # the margin lets the server's own session timeout (which answers with an error) fire first
    unbounded = runner.pool
    runner.pool = PopenPoolExecutor(max_workers=n_workers, timeout=device.session_timeout_s + 10)
    unbounded.shutdown(wait=False)
    return runner


def remote_timer(device: RemoteDevice, repeat: int = 15) -> Callable[..., float]:
    """A ``time_primfunc``-like function, ``(mod, target) -> median seconds of one call of mod["main"]``, that
    builds here and times on a server under ``device.key`` (random inputs drawn on the server)."""
    import numpy as np
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    def timer(mod, target, repeat: int = repeat) -> float:
        tracker = _connect_tracker(device)
        session = tracker.request(device.key, priority=0, session_timeout=device.session_timeout_s)
        lib = tvm.compile(mod, target=target)
        with tempfile.TemporaryDirectory(prefix="softswap-rpc-") as tmp:
            path = os.path.join(tmp, "primfunc.so")
            lib.export_library(path)
            session.upload(path)
            remote = session.load_module("primfunc.so")
        dev = session.cpu(0)
        rng = np.random.default_rng(0)
        args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in a.shape]).astype(str(a.dtype)), dev)
                for a in ArgInfo.from_prim_func(mod["main"])]
        evaluator = remote.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=0)
        return float(np.median(evaluator(*args).results))

    return timer


def _connect_tracker(device: RemoteDevice):
    from tvm import rpc

    start = time.perf_counter()
    try:
        return rpc.connect_tracker(device.host, device.port)
    except Exception as exc:  # noqa: BLE001 - the tracker went away after the pre-flight check
        raise RemoteTuningError(f"RPC tracker {device.address} (key {device.key}) unreachable after "
                                f"{time.perf_counter() - start:.0f}s: {exc}", culprit=device.address) from None


def describe(device: RemoteDevice | None) -> dict | None:
    """The JSON-able description stored in the tuning summary."""
    return None if device is None else {"tracker": device.address, "device_key": device.key}


__all__ = ["RemoteDevice", "parse_rpc", "tracker_summary", "count_workers", "check_tracker", "make_runner",
           "remote_timer", "describe"]
