"""A real two-node Ray cluster on this machine: head and worker as separate `ray start`
processes with one CPU each, so a two-stage job must put one stage on each node."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from decoupled.ray_runtime.transport_torch import free_port
from tests.conftest import DIGITS_CONFIG

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Own session: the test stops exactly what it started (the group), nothing else on the box.
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", *args, "--block"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{log.name}: no {text!r} within {timeout}s:\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    logs = tmp_path_factory.mktemp("ray-nodes")
    port = free_port()
    # Ray >= 2.59 authenticates local clusters with a token: one shared secret for every process.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    head = _start(
        ["--head", "--port", str(port), "--include-dashboard=false", *common],
        env,
        logs / "head.log",
    )
    worker = None
    try:
        _wait_for(logs / "head.log", "Ray runtime started", head, 90)
        worker = _start(["--address", f"127.0.0.1:{port}", *common], env, logs / "worker.log")
        _wait_for(logs / "worker.log", "Ray runtime started", worker, 90)
        yield f"127.0.0.1:{port}", env
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)


@pytest.mark.timeout(300)
def test_job_places_stages_on_both_nodes(
    two_nodes: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    address, env = two_nodes
    out = tmp_path / "run"
    result = subprocess.run(
        [
            str(BIN / "decoupled"),
            "train",
            str(DIGITS_CONFIG),
            "stages=2",
            "train.steps=60",
            f"runtime.address={address}",
            "runtime.timeout_s=120",
            "train.progress=false",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60
    assert len(summary["nodes"]) == 2
    assert len({stage["node_id"] for stage in summary["stages"]}) == 2
    assert summary["test_accuracy"] > 0.5
