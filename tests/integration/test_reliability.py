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
import ray
import torch

from decoupled.api import run_training
from decoupled.checkpoint import complete_steps, latest_cut, load_stage
from decoupled.data import Dataset
from decoupled.local import LocalTrainer
from decoupled.ray_runtime.controller import RayJob
from decoupled.stage import NonFiniteError
from tests.conftest import DIGITS_CONFIG, digits_config
from tests.integration import paced_data
from tests.integration.conftest import actor_of_this_cluster

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]


def _records(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines[:-1]] + _whole(lines[-1:])


def _whole(lines: list[str]) -> list[dict[str, Any]]:
    """The last line, unless it is still being written."""
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError:
        return []


def _step(out: Path) -> int:
    return max((r.get("step", 0) for r in _records(out)), default=0)


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


# cDNI on three stages, each fault; delayed, asynchronous (its late gradients of steps before
# the cut are lost with the actors, its stashes start empty), a kill. dgl, ddp and delayed in
# lockstep lose a stage too before the Ctrl-C below, where the restart must be exact.
KILLS = {
    "cdni": ["method.name=cdni", "stages=3", "train.epochs=12"],
    "delayed": ["method.name=delayed", "stages=2", "train.epochs=30"],
}


def _reference_accuracy(method: str, digits: Dataset) -> float:
    """The same run undisturbed, in-process."""
    if method not in _undisturbed:
        cfg = digits_config(*KILLS[method], "runtime.backend=local", "runtime.gpus_per_stage=0")
        _undisturbed[method] = LocalTrainer(cfg, digits).run()["test_accuracy"]
    return _undisturbed[method]


@pytest.mark.parametrize(
    ("method", "fault"),
    [("cdni", signal.SIGKILL), ("cdni", signal.SIGSTOP), ("delayed", signal.SIGKILL)],
    ids=["cdni-SIGKILL", "cdni-SIGSTOP", "delayed-SIGKILL"],
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


# Each method's run. The methods that landed later run on two stages (ddp: replicas); delayed in
# lockstep, where its late gradients, and so its weights, do not depend on timing. An even split:
# the in-process reference must cut the model where the command does. The interrupted run reads
# its data slowly (tests/integration/paced_data.py) until the signal has been handled, so the cut
# it asks for lands well before the end on a machine of any speed; the resumed run and the
# reference read the same batches at full speed.
SIGINT_RUNS = {
    "backprop": ["method.name=backprop"],
    "dgl": ["method.name=dgl", "stages=2"],
    "delayed": ["method.name=delayed", "stages=2", "runtime.lockstep=true"],
    "ddp": ["method.name=ddp", "stages=2"],
}
SIGINT_STEPS = 500
CUT_EVERY = 50
# Which of them also lose a stage actor (SIGKILL) before the signal: the restart from the cut
# is exact too (dgl's heads, delayed's emptied stashes, ddp's process group opened again).
KILLED_FIRST = ("dgl", "delayed", "ddp")


def _paced(run: list[str], root: Path) -> list[str]:
    """``run`` on the digits of paced_data.py, paced while ``root/paced`` exists."""
    return [
        *run,
        "data.name=tests.integration.paced_data:digits",
        f"data.root={root}",
        f"train.steps={SIGINT_STEPS}",
        f"checkpoint.every={CUT_EVERY}",
    ]


def _cli(run: list[str], out: Path) -> list[str]:
    """The command of ``run``, on the module's Ray cluster (no Ray start-up of its own)."""
    address = ray.get_runtime_context().gcs_address
    return [
        sys.executable,
        "-m",
        "decoupled.cli",
        "train",
        str(DIGITS_CONFIG),
        *run,
        "model.boundaries=even",
        "train.progress=false",
        f"runtime.address={address}",
        "--out",
        str(out),
    ]


def _weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A stage's tensors by dotted name: its blocks and whatever its method keeps beside them
    (dgl's auxiliary head), optimizer state included."""
    out: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, Any]] = list(state.items())
    while pending:
        name, value = pending.pop()
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, dict):
            pending += [(f"{name}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list | tuple):
            pending += [(f"{name}.{k}", v) for k, v in enumerate(value)]
    return out


def _restarted(out: Path) -> dict[str, Any] | None:
    return next((r for r in _records(out) if r["event"] == "restart"), None)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", list(SIGINT_RUNS))
def test_sigint_then_resume_matches_an_uninterrupted_run_exactly(
    tmp_path: Path, method: str
) -> None:
    interrupted, whole, steps = tmp_path / "interrupted", tmp_path / "whole", SIGINT_STEPS
    run = _paced(SIGINT_RUNS[method], root=tmp_path)
    pace = tmp_path / paced_data.MARKER
    pace.touch()
    t0 = time.monotonic()
    process = subprocess.Popen(_cli(run, out=interrupted), stderr=subprocess.PIPE, text=True)
    signal_at = 2 * CUT_EVERY
    if method in KILLED_FIRST:
        _wait_for_step(interrupted, CUT_EVERY, timeout=120)
        deadline = time.monotonic() + 60
        while not complete_steps(interrupted / "checkpoints"):
            assert time.monotonic() < deadline, "no cut sealed"
            time.sleep(0.1)
        os.kill(actor_of_this_cluster("StageActor"), signal.SIGKILL)
        while (restart := _restarted(interrupted)) is None:
            assert time.monotonic() < deadline + 60, "no restart after the kill"
            time.sleep(0.1)
        assert restart["step"] >= CUT_EVERY
        signal_at = restart["step"] + CUT_EVERY
        # Training again, from the cut, as far as the signal's step.
        while not any(
            r["event"] == "train" and r["step"] >= signal_at
            for r in _records(interrupted)[_records(interrupted).index(restart) :]
        ):
            assert time.monotonic() < deadline + 120, "no training after the restart"
            time.sleep(0.1)
    else:
        _wait_for_step(interrupted, signal_at, timeout=120)
    print("signal", time.monotonic() - t0, _step(interrupted), flush=True)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    pace.unlink()
    print("interrupted", time.monotonic() - t0, flush=True)
    assert process.returncode == 130, err
    assert "interrupted by SIGINT" in err and "checkpoint at" in err and "Traceback" not in err
    cut = latest_cut(interrupted / "checkpoints")
    assert cut is not None and signal_at <= cut.step < steps

    resume = [*_cli(run, out=interrupted)[:-2], "--resume", str(interrupted)]
    resumed = subprocess.run(resume, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["steps"] == steps and summary["resumed_from"] == cut.step
    # The reference needs no command of its own: in this process, on the module's Ray, it is
    # the same run (same config, same actors of one thread) without a process of its own.
    print("resumed", time.monotonic() - t0, flush=True)
    run_training(digits_config(*run), whole)
    print("reference", time.monotonic() - t0, flush=True)

    final = [latest_cut(d / "checkpoints") for d in (interrupted, whole)]
    assert all(c is not None and c.step == steps for c in final)
    a, b = final
    assert a is not None and b is not None and a.num_stages == b.num_stages
    for index in range(a.num_stages):
        mine, reference = (_weights(load_stage(c, index, torch.device("cpu"))) for c in (a, b))
        assert mine.keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(mine[name], value), (index, name)
