"""A real multi-node Ray cluster on this machine: head and workers as separate `ray start --block`
processes, each in a session of its own so that a test stops exactly what it started."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from decoupled.ray_runtime.transport_torch import free_port

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0
# Small object stores: several clusters may share this box with other tests.
OBJECT_STORE_BYTES = 150 * 2**20


@dataclass(frozen=True)
class LocalCluster:
    address: str  # the GCS, HOST:PORT, for `runtime.address`
    dashboard: str | None  # http://HOST:PORT for `ray job submit`, when started with one
    env: dict[str, str]  # what a client of this cluster needs: the same token, the same PATH


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", *args, "--block"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop one `ray start --block` and everything in its session."""
    if process.poll() is None:
        # SIGTERM to the leader alone: it drains the node and stops its own children in a few
        # seconds. Signalling the whole group kills the GCS first, and the leader's drain call
        # then waits 30 s for it.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    # Anything of its session still alive (e.g. a worker process it lost track of).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{log.name}: no {text!r} within {timeout}s:\n{log.read_text()[-2000:]}")


@contextlib.contextmanager
def local_cluster(logs: Path, workers: int = 1, dashboard: bool = False) -> Iterator[LocalCluster]:
    """A head and ``workers`` worker nodes, one CPU and no GPU each; token auth as Ray >= 2.59
    requires for local clusters (one shared secret for every process)."""
    port = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # A job's entrypoint runs `python` from the head's PATH: this interpreter's, with the
        # project installed, as the image's would be on a real cluster.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    common = [
        "--num-cpus=1",
        "--num-gpus=0",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--disable-usage-stats",
    ]

    def own_ports() -> list[str]:
        # Fixed by default (52365), so nodes sharing a machine race for it: the loser's agent
        # runs without HTTP, and a head whose agent lost cannot accept jobs.
        return [f"--dashboard-agent-listen-port={free_port()}"]

    head_args = ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}"]
    head_args += [*common, *own_ports()]
    url = None
    if dashboard:
        dashboard_port = free_port()
        head_args += [
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
        ]
        url = f"http://127.0.0.1:{dashboard_port}"
    else:
        head_args.append("--include-dashboard=false")
    started = [_start(head_args, env, logs / "head.log")]
    try:
        _wait_for(logs / "head.log", "Ray runtime started", started[0], START_TIMEOUT_S)
        for i in range(workers):
            log = logs / f"worker{i}.log"
            args = [f"--address=127.0.0.1:{port}", *common, *own_ports()]
            started.append(_start(args, env, log))
            _wait_for(log, "Ray runtime started", started[-1], START_TIMEOUT_S)
        yield LocalCluster(f"127.0.0.1:{port}", url, env)
    finally:
        for process in reversed(started):
            stop(process)
