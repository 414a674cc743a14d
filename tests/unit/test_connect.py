"""Joining a cluster that is not there, or not a Ray cluster: a bounded wait and one clear line.

The same for a cluster that refuses the client's token: tests/integration/test_two_nodes.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from decoupled.config import ConfigError
from decoupled.ray_runtime.connect import ClusterUnreachable, check_cluster
from tests.conftest import DIGITS_CONFIG, ROOT


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        # Every interface: Ray turns 127.0.0.1 into this machine's address before connecting.
        listener.bind(("", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def test_the_cli_fails_at_once_where_nothing_listens(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "decoupled.cli",
            "train",
            str(DIGITS_CONFIG),
            f"runtime.address={address}",
            "runtime.timeout_s=10",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    # Ray alone retried for minutes, with a warning every few seconds; the margin is the
    # interpreter, torch and the dataset loading on a shared box.
    assert elapsed < 10 + 20, elapsed
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"decoupled: cannot join the Ray cluster: nothing answered at {address}")
    assert "runtime.address" in line and "port" in line and "RAY_AUTH_TOKEN" in line


def test_a_port_that_is_not_a_gcs_fails_within_the_timeout(
    silent_port: int, capfd: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match="did not answer as a Ray cluster within 2s"):
        check_cluster(f"127.0.0.1:{silent_port}", timeout_s=2.0)
    assert time.monotonic() - started < 2.0 + 1.5
    assert capfd.readouterr().err == ""  # Ray's own per-try warnings are held back


@pytest.mark.parametrize("address", ["nohost", "host:port"])
def test_an_address_that_is_not_host_port_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match=r"runtime\.address"):
        check_cluster(address, timeout_s=1.0)
