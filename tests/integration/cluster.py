"""A real multi-node Ray cluster on this machine: head and workers as separate `ray start --block`
processes, each in a session of its own so that a test stops exactly what it started, or kills
one node outright as if its machine were lost."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from decoupled.checkpoint import complete_steps
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
    # The `ray start --block` of each node, the head first; each leads a session of its own.
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def processes(self, node: int) -> list[int]:
        """The live processes of ``node`` (0 is the head): raylet, agents, Ray workers."""
        return _session(self.nodes[node].pid)

    def node_id(self, node: int) -> str:
        """Ray's hex node ID of ``node``, as its raylet was told at start."""
        for pid in self.processes(node):
            for arg in _cmdline(pid):
                if arg.startswith("--node_id="):
                    return arg.removeprefix("--node_id=")
        raise AssertionError(f"node {node} has no raylet with a --node_id")

    def pids(self, node: int, title: str) -> list[int]:
        """The Ray workers of ``node`` whose process title starts with ``title`` (Ray names an
        actor's process ``ray::CLASS`` or ``ray::CLASS.METHOD``)."""
        return [
            pid
            for pid in self.processes(node)
            if (cmd := _cmdline(pid)) and cmd[0].startswith(title)
        ]

    def hosts(self, node: int, title: str) -> bool:
        """Whether ``node`` runs a Ray worker whose process title starts with ``title``."""
        return bool(self.pids(node, title))

    def freeze_node(self, node: int) -> None:
        """SIGSTOP everything of ``node``, as if its machine hung: the kernel still accepts
        connections to its ports, and nothing answers on them. ``kill_node`` ends it."""
        for pid in self.processes(node):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)

    def kill_node(self, node: int) -> None:
        """SIGKILL everything of ``node`` at once, as if its machine were lost: no drain, no
        goodbye to the GCS, which must find out by itself."""
        leader = self.nodes[node]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        # A process that left the group (none does in Ray 2.60) is still of the session.
        for pid in _session(leader.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        leader.wait(timeout=10)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone since the listing
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux: /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getsid(int(entry.name)) == sid:
                pids.append(int(entry.name))
    return pids


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
def local_cluster(
    logs: Path,
    workers: int = 1,
    dashboard: bool = False,
    extra_env: dict[str, str] | None = None,
    worker_cpus: Sequence[int] = (),
) -> Iterator[LocalCluster]:
    """A head of one CPU and ``workers`` worker nodes, no GPU, of one CPU each or of
    ``worker_cpus[i]`` CPUs;
    token auth as Ray >= 2.59 requires for local clusters (one shared secret for every
    process). ``extra_env`` reaches every node and client (e.g. ``RAY_*`` system settings)."""
    port = free_port()
    env = {
        **os.environ,
        **(extra_env or {}),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # A job's entrypoint runs `python` from the head's PATH: this interpreter's, with the
        # project installed, as the image's would be on a real cluster.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    common = [
        "--num-gpus=0",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--disable-usage-stats",
    ]

    def own_ports() -> list[str]:
        # Fixed by default (52365), so nodes sharing a machine race for it: the loser's agent
        # runs without HTTP, and a head whose agent lost cannot accept jobs.
        return [f"--dashboard-agent-listen-port={free_port()}"]

    head_args = ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}"]
    head_args += ["--num-cpus=1", *common, *own_ports()]
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
        # One after the other: nodes of one IP that start together mix up their node info
        # (Ray 2.60 times out with "Failed to get node info").
        for i in range(workers):
            log = logs / f"worker{i}.log"
            cpus = worker_cpus[i] if worker_cpus else 1
            args = [f"--address=127.0.0.1:{port}", f"--num-cpus={cpus}", *common]
            args += own_ports()
            started.append(_start(args, env, log))
            _wait_for(log, "Ray runtime started", started[-1], START_TIMEOUT_S)
        yield LocalCluster(f"127.0.0.1:{port}", url, env, nodes=list(started))
    finally:
        for process in reversed(started):
            stop(process)


# A second driver of the cluster, in a process of its own (Ray reads the token once per
# process): each placement group when first seen placed, as a JSON line with the time
# (CLOCK_MONOTONIC, the same in every process) and the nodes of its bundles.
WATCH = """
import json, logging, sys, time
import ray
ray.init(address=sys.argv[1], logging_level=logging.WARNING)
seen = set()
with open(sys.argv[2], "a") as out:
    while True:
        for pg_id, pg in ray.util.placement_group_table().items():
            if pg["state"] == "CREATED" and pg_id not in seen:
                seen.add(pg_id)
                nodes = sorted(set(pg["bundles_to_node_id"].values()))
                print(json.dumps([pg_id, time.monotonic(), nodes]), file=out, flush=True)
        time.sleep(0.05)
"""


class PlacementWatch:
    """When each placement group of the cluster was placed, and on which nodes."""

    def __init__(self, cluster: LocalCluster, log: Path) -> None:
        self.log = log
        log.touch()
        self.process = subprocess.Popen(
            [sys.executable, "-c", WATCH, cluster.address, str(log)], env=cluster.env
        )

    def placed(self) -> dict[str, tuple[float, set[str]]]:
        placed = {}
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                pg_id, at, nodes = json.loads(line)
                placed[pg_id] = (at, set(nodes))
        return placed

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


def run_records(out: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl so far."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    # The last line may be half written while the run goes on.
    lines = path.read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def wait_until(
    what: str, found: Callable[[], bool], process: subprocess.Popen[bytes], timeout: float
) -> float:
    """Poll ``found`` until true; the time it took. Fails on timeout or if the run exits."""
    start = time.monotonic()
    while not found():
        assert process.poll() is None, f"the run exited ({process.returncode}) before {what}"
        assert time.monotonic() - start < timeout, f"no {what} within {timeout:g}s"
        time.sleep(0.1)
    return time.monotonic() - start


@dataclass
class NodeLoss:
    """What ``hang_the_large_worker`` saw: the run, the cut before the loss, and when the
    restart was reported and placed again (CLOCK_MONOTONIC)."""

    process: subprocess.Popen[bytes]
    out: Path  # the run folder
    log: Path  # its stdout and stderr
    lost_id: str
    alive: set[str]  # the nodes left
    sealed: int  # the last sealed cut when the node hung
    frozen: float
    noticed: float  # seconds from the freeze to the restart record
    event: dict[str, Any]  # that record
    placed_at: float  # when the first placement group after the freeze was placed...
    placed_on: set[str]  # ...and on which nodes

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def hang_the_large_worker(
    cluster: LocalCluster, tmp_path: Path, train: list[str], titles: Sequence[str]
) -> Iterator[NodeLoss]:
    """Run ``decoupled train *train`` on ``cluster`` (head, workers of 6 and 2 CPUs); once a cut
    is sealed, check that the actors titled ``titles`` are all on the large worker (node 1),
    hang it (SIGSTOP), and wait for the restart record and the next placement group. Yields
    there, the run going on; afterwards the hung node is killed and a run still going too."""
    out, log_path = tmp_path / "run", tmp_path / "train.log"
    watch = PlacementWatch(cluster, tmp_path / "placements.jsonl")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(BIN / "decoupled"), "train", *train, "--out", str(out)],
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        checkpoints = out / "checkpoints"
        wait_until("sealed cut", lambda: bool(complete_steps(checkpoints)), process, 120)
        # Ray packs the one-CPU bundles on the node with the most room.
        hosting = [n for n in (0, 1, 2) if any(cluster.hosts(n, t) for t in titles)]
        assert hosting == [1], f"the actors are on nodes {hosting}, not all on the large worker"
        lost_id, alive = cluster.node_id(1), {cluster.node_id(0), cluster.node_id(2)}
        sealed = complete_steps(checkpoints)[-1]
        cluster.freeze_node(1)
        frozen = time.monotonic()

        def restart() -> dict[str, Any] | None:
            return next((r for r in run_records(out) if r.get("event") == "restart"), None)

        noticed = wait_until("restart", lambda: restart() is not None, process, 120)
        event = restart()
        assert event is not None

        def placed_again() -> list[tuple[float, set[str]]]:
            return sorted(p for p in watch.placed().values() if p[0] > frozen)

        wait_until("placement after the restart", lambda: bool(placed_again()), process, 120)
        placed_at, placed_on = placed_again()[0]
        yield NodeLoss(
            process,
            out,
            log_path,
            lost_id,
            alive,
            sealed,
            frozen,
            noticed,
            event,
            placed_at,
            placed_on,
        )
    finally:
        watch.close()
        cluster.kill_node(1)  # the hung node, for good (the fixture's stop would wait for it)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
