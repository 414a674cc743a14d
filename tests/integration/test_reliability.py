"""Failures on a real local Ray cluster: killed and hung stage actors, NaNs, Ctrl-C + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from decoupled.api import run_training
from decoupled.checkpoint import latest_cut, load_stage
from decoupled.data import Dataset
from decoupled.local import LocalTrainer
from decoupled.ray_runtime.controller import RayJob
from decoupled.stage import NonFiniteError
from tests.conftest import DIGITS_CONFIG, digits_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]


def _step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()]
    return max(steps, default=0)


def _run_in_background(job: RayJob, out: Path) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["summary"] = job.run(out)
        except BaseException as err:  # handed to the test thread
            result["error"] = err
        finally:
            job.teardown()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _wait_for_step(out: Path, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _step(out) < step:
        assert time.monotonic() < deadline, f"the run did not reach step {step} in {timeout}s"
        time.sleep(0.2)


_undisturbed: dict[str, float] = {}  # one in-process reference per method


# (method, its run): cDNI on three stages, each fault; the methods that landed later on two
# stages (ddp: two replicas, whose process group a restart must open again), a kill each.
KILLS = {
    "cdni": ["method.name=cdni", "stages=3", "train.epochs=12"],
    "dgl": ["method.name=dgl", "stages=2", "train.epochs=30"],
    "delayed": ["method.name=delayed", "stages=2", "train.epochs=30"],
    "ddp": ["method.name=ddp", "stages=2", "train.epochs=30"],
}


def _reference_accuracy(method: str, digits: Dataset) -> float:
    """The same run undisturbed, in-process (ddp, actors only: backprop on its global batch)."""
    if method not in _undisturbed:
        common = KILLS[method] if method != "ddp" else [*KILLS[method][2:], "stages=1"]
        name = "method.name=backprop" if method == "ddp" else KILLS[method][0]
        cfg = digits_config(*common, name, "runtime.backend=local")
        _undisturbed[method] = LocalTrainer(cfg, digits).run()["test_accuracy"]
    return _undisturbed[method]


@pytest.mark.parametrize(
    ("method", "fault"),
    [
        ("cdni", signal.SIGKILL),
        ("cdni", signal.SIGSTOP),
        ("dgl", signal.SIGKILL),
        ("delayed", signal.SIGKILL),
        ("ddp", signal.SIGKILL),
    ],
)
def test_a_killed_or_hung_stage_is_restarted_and_the_run_finishes(
    digits: Dataset, tmp_path: Path, method: str, fault: signal.Signals
) -> None:
    every, at = (40, 90) if method == "cdni" else (25, 60)
    cfg = digits_config(*KILLS[method], f"checkpoint.every={every}", "runtime.stall_timeout_s=5")
    job = RayJob(cfg, digits, tmp_path)
    thread, result = _run_in_background(job, tmp_path)
    _wait_for_step(tmp_path, at, timeout=120)
    os.kill(job.described[1]["pid"], fault)
    thread.join(timeout=240)
    assert not thread.is_alive(), "the run did not finish after the fault"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["restarts"] == 1
    assert summary["steps"] == cfg.train.epochs * (1438 // 64)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    restarts = [r for r in records if r["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["step"] >= every  # resumed from a cut, not from 0
    assert summary["test_accuracy"] >= _reference_accuracy(method, digits) - 0.05


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    digits: Dataset, tmp_path: Path
) -> None:
    # SGD with lr 0.3 on an unnormalised head diverges within a few dozen steps; cuts every 5.
    cfg = digits_config(
        "method.name=backprop",
        "optim.name=sgd",
        "optim.lr=30",
        "model.batch_norm=false",
        "train.steps=500",
        "checkpoint.every=5",
    )
    job = RayJob(cfg, digits, tmp_path)
    try:
        with pytest.raises(NonFiniteError, match="non-finite"):
            job.run(tmp_path)
    finally:
        job.teardown()
    cut = latest_cut(tmp_path / "checkpoints")
    assert cut is not None and 0 < cut.step < 500
    state = load_stage(cut, 0, torch.device("cpu"))
    assert all(torch.isfinite(t).all() for t in state["module"].values() if t.is_floating_point())


# Enough steps after the signal for the cut it asks for to land before the end.
STEPS = 1000
RUN = ["method.name=backprop", f"train.steps={STEPS}", "checkpoint.every=100"]


def _cli(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "decoupled.cli",
        "train",
        str(DIGITS_CONFIG),
        *RUN,
        "train.progress=false",
        "--out",
        str(out),
    ]


@pytest.mark.timeout(300)
def test_sigint_then_resume_matches_an_uninterrupted_run_exactly(tmp_path: Path) -> None:
    interrupted, whole = tmp_path / "interrupted", tmp_path / "whole"
    process = subprocess.Popen(_cli(out=interrupted), stderr=subprocess.PIPE, text=True)
    _wait_for_step(interrupted, 200, timeout=120)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted by SIGINT" in err and "checkpoint at" in err and "Traceback" not in err
    cut = latest_cut(interrupted / "checkpoints")
    assert cut is not None and 200 <= cut.step < STEPS

    resume = [*_cli(out=interrupted)[:-2], "--resume", str(interrupted)]
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"] == cut.step
    # The reference needs no command of its own: in this process, on the module's Ray, it is
    # the same run (same config, one actor of one thread) without a second Ray start-up.
    run_training(digits_config(*RUN), whole)

    final = [latest_cut(d / "checkpoints") for d in (interrupted, whole)]
    assert all(c is not None and c.step == STEPS for c in final)
    a, b = (load_stage(c, 0, torch.device("cpu")) for c in final if c is not None)
    for name, value in b["module"].items():
        assert torch.equal(a["module"][name], value), name
