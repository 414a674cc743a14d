"""Two cores at two clock rates on two Ray actors (decoupled/ray_runtime/clock.py): the slow actor
does not wait for a slowed fast actor when decoupled, and does when lockstep; a lockstep run
interrupted and resumed on the actors, or restarted after one of them is killed, ends as an
uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import decoupled
from decoupled.checkpoint import complete_steps, latest_cut, load_stage
from decoupled.interrupt import Interrupted, StopRequest
from tests.integration.conftest import actor_of_this_cluster, logical_cluster
from tests.unit.test_clock import _equal

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


def _paced_lockstep(total: int, cut_every: int) -> dict[str, Any]:
    """A small lockstep two-core run on the actors, its slow core paced so that a signal or a
    kill lands well before the end."""
    return {
        "seed": 1,
        "stages": 2,
        "data": {"name": "lag_copy", "batch_size": 8},
        "model": {"name": "lstm", "layers": 1, "hidden": 16, "bptt": 2},
        "method": {"name": "backprop"},
        "recurrent": {"alphabet": 4},
        "clock": {"every": 4, "slow_hidden": 16, "interface": 8, "slow_delay_s": 0.05},
        "train": {"steps": total, "log_every": 5, "progress": False},
        "checkpoint": {"every": cut_every},
        "runtime": {"backend": "ray", "timeout_s": 120, "stall_timeout_s": 60},
    }


def _stop_once_logged(metrics: Path, stop: StopRequest) -> threading.Thread:
    """Ctrl-C, as the handler records it, once the run has logged its first record."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.is_file() and metrics.read_text().strip():
                stop.signum = signal.SIGINT
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.usefixtures("small_cluster")
def test_lockstep_actors_interrupted_and_resumed_end_as_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """Ctrl-C: the slow actor cuts at its next tick, the fast one before reading that tick's
    output; the resumed actors end bit for bit where one uninterrupted run (in-process) does."""
    total = 100
    # Only the interrupt's cut and the final one.
    config = _paced_lockstep(total, cut_every=1000)
    quick = ["clock.slow_delay_s=0"]
    reference = tmp_path / "reference"
    decoupled.train(config, [*quick, "runtime.backend=local"], out=reference)
    run, stop = tmp_path / "run", StopRequest()
    watcher = _stop_once_logged(run / "metrics.jsonl", stop)
    with pytest.raises(Interrupted) as info:
        decoupled.train(config, out=run, stop=stop)
    watcher.join(1)
    cut = latest_cut(run / "checkpoints")
    assert cut is not None and 0 < cut.step < total, cut
    assert info.value.checkpoint == str(cut.path) and info.value.step == cut.step
    summary = decoupled.train(config, quick, out=run, resume=True)
    assert summary["resumed_from"] == cut.step
    assert summary["steps"] == summary["slow_chunks"] == summary["fast_chunks"] == total
    saved = json.loads((run / "summary.json").read_text())
    assert saved["resumed_from"] == cut.step and saved["steps"] == total
    _assert_same_end(run, reference)


def _assert_same_end(run: Path, reference: Path) -> None:
    """Both runs' last cuts hold the same cores, optimizers and states, bit for bit."""
    ends = [latest_cut(r / "checkpoints") for r in (run, reference)]
    assert ends[0] is not None and ends[1] is not None and ends[0].step == ends[1].step
    for index in (0, 1):
        a, b = (load_stage(end, index, torch.device("cpu")) for end in ends if end is not None)
        for key in ("core", "optimizer", "state"):
            assert _equal(a[key], b[key]), (index, key)


def _train_in_background(
    config: dict[str, Any], out: Path
) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["summary"] = decoupled.train(config, out=out)
        except BaseException as err:  # handed to the test thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _kill_after_first_cut(out: Path, actor: str) -> int:
    """SIGKILL the ``actor`` (class name) once a cut is sealed; that cut's step."""
    deadline = time.monotonic() + 120
    while not (steps := complete_steps(out / "checkpoints")):
        assert time.monotonic() < deadline, "no cut sealed"
        time.sleep(0.05)
    os.kill(actor_of_this_cluster(actor), signal.SIGKILL)
    return steps[-1]


@pytest.mark.usefixtures("small_cluster")
def test_a_killed_core_actor_restarts_both_from_the_last_cut_and_ends_as_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fast actor killed after the first cut: both restart from it and, lockstep, end bit for
    bit where an uninterrupted in-process run does. With no restart allowed (the slow actor
    killed), the run fails saying so, and its cut stays."""
    total = 80
    config = _paced_lockstep(total, cut_every=10)
    reference = tmp_path / "reference"
    decoupled.train(config, ["clock.slow_delay_s=0", "runtime.backend=local"], out=reference)

    run = tmp_path / "run"
    thread, result = _train_in_background(config, run)
    cut = _kill_after_first_cut(run, "FastActor")
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["restarts"] == 1 and summary["steps"] == summary["fast_chunks"] == total
    assert json.loads((run / "summary.json").read_text())["restarts"] == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    restarts = [r for r in records if r["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["step"] >= cut > 0, (restarts, cut)
    assert "fast core" in restarts[0]["reason"]
    # The new actors started from the cut, not from the start: only the chunks after it ran.
    assert summary["samples"] == (total - restarts[0]["step"]) * 4 * 8
    assert f"restart 1/3 from step {restarts[0]['step']}" in capsys.readouterr().err
    _assert_same_end(run, reference)

    spent = tmp_path / "spent"
    config["runtime"]["max_failures"] = 0
    thread, result = _train_in_background(config, spent)
    _kill_after_first_cut(spent, "SlowActor")
    thread.join(timeout=120)
    assert not thread.is_alive() and "summary" not in result
    error = str(result["error"])
    assert "slow core" in error and "no restart left (runtime.max_failures=0)" in error, error
    kept = latest_cut(spent / "checkpoints")
    assert kept is not None and 0 < kept.step < total and str(kept.path) in error
