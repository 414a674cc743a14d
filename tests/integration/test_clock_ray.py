"""Two cores at two clock rates on two Ray actors (decoupled/ray_runtime/clock.py): the slow actor
does not wait for a slowed fast actor when decoupled, and does when lockstep."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import decoupled
from tests.integration.conftest import logical_cluster

pytestmark = pytest.mark.integration

STEPS, PAUSE = 30, 0.05


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[None]:
    """Two logical CPUs: one actor each."""
    with logical_cluster(num_cpus=2):
        yield


def _run(out: Path, method: str) -> dict[str, Any]:
    config = {
        "seed": 0,
        "stages": 2,
        "data": {"name": "lag_copy", "batch_size": 8},
        "model": {"name": "lstm", "layers": 1, "hidden": 16, "bptt": 2},
        "method": {"name": method, "sg": {"layers": 1, "hidden": 16}},
        "recurrent": {"alphabet": 4},
        # The fast actor sleeps PAUSE s per chunk: far slower than the slow one.
        "clock": {"every": 4, "slow_hidden": 16, "interface": 8, "fast_delay_s": PAUSE},
        "train": {"steps": STEPS, "log_every": 10, "progress": False},
        "runtime": {"backend": "ray", "timeout_s": 120, "stall_timeout_s": 60},
    }
    summary: dict[str, Any] = decoupled.train(config, out=out)
    assert json.loads((out / "summary.json").read_text())["mode"] == summary["mode"]
    return summary


@pytest.mark.usefixtures("small_cluster")
def test_slow_actor_never_waits_for_a_slowed_fast_actor(tmp_path: Path) -> None:
    free = _run(tmp_path / "dni", "dni")
    assert free["mode"] == "decoupled" and free["slow_chunks"] == STEPS
    assert free["slow_wait_s"] < 0.05, free["slow_wait_s"]
    # The fast actor kept up only by taking the newest output and skipping the rest.
    assert free["fast_chunks"] < STEPS and free["skipped_chunks"] > 0
    assert free["fast_chunks"] + free["skipped_chunks"] >= STEPS - 1
    assert free["slow_samples_per_s"] > 2 * free["fast_samples_per_s"]
    lock = _run(tmp_path / "backprop", "backprop")
    assert lock["mode"] == "lockstep" and lock["fast_chunks"] == STEPS
    assert lock["skipped_chunks"] == 0
    assert lock["slow_wait_s"] > 0.8 * STEPS * PAUSE  # it waited for every true gradient
