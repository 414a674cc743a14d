"""Checkpoints of the one-stage recurrent runs (decoupled/recurrent/trainer.py): a run stopped at
a cut and resumed ends exactly where the uninterrupted run does; Ctrl-C leaves a cut; a
diverged run keeps its last good cut."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from decoupled.checkpoint import latest_cut, load_stage
from decoupled.cli import main
from decoupled.config import Config, parse_config
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.recurrent.trainer import RecurrentRun, build_run
from decoupled.stage import NonFiniteError

ROOT = Path(__file__).resolve().parents[2]
CUTS_EVERY, STOP_AT, STEPS = 5, 13, 24
# Short enough that 8 streams of 4-character segments wrap around the text after the cuts.
CORPUS = ("The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. ") * 8


def _cfg(tmp_path: Path, task: str, method: str, *extra: str) -> Config:
    raw = {
        "stages": 1,
        "data": {"name": task, "batch_size": 8},
        "model": {"name": "lstm", "hidden": 16, "layers": 1, "bptt": 2},
        "method": {"name": method, "sg": {"layers": 0}},
        "train": {"steps": STEPS, "log_every": 4, "eval_every": 8, "progress": False},
        "checkpoint": {"every": CUTS_EVERY},
        "runtime": {"backend": "local"},
        # Every full window raises the length: the curriculum moves on across the cuts, with
        # part of a window recorded at each.
        "recurrent": {"threshold": 100.0, "window": 3, "start_length": 1, "eval_chars": 100},
    }
    if task == "charlm":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(CORPUS)
        raw["data"]["root"] = str(corpus)  # type: ignore[index]
        raw["model"]["bptt"] = 4  # type: ignore[index]
    return parse_config(raw, list(extra))


def _tensors(state: Any) -> list[torch.Tensor]:
    """Every tensor in a nested state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, list | tuple):
        return [t for value in state for t in _tensors(value)]
    return []


def _records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in lines]


def _stop_after(run: RecurrentRun, steps: int) -> None:
    """Ctrl-C during step ``steps`` (what the signal handler does), seen at its end."""
    original: Callable[[], Any] = run.step
    done = 0

    def step() -> Any:
        nonlocal done
        out = original()
        done += 1
        if done == steps:
            run.stop.signum = signal.SIGINT
        return out

    run.step = step  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("task", "method", "extra"),
    [
        ("copy", "dni", ()),
        ("copy", "backprop", ()),
        ("repeat_copy", "dni", ("recurrent.aux_weight=0.1",)),
        ("charlm", "dni", ()),
        ("charlm", "backprop", ()),
    ],
)
def test_a_run_resumed_from_a_cut_ends_as_the_uninterrupted_one(
    tmp_path: Path, task: str, method: str, extra: tuple[str, ...]
) -> None:
    cfg = _cfg(tmp_path, task, method, *extra)
    for name in ("whole", "a"):
        (tmp_path / name).mkdir()
    whole = build_run(cfg, tmp_path / "whole")
    expected = whole.run()

    stopped = build_run(cfg, tmp_path / "a", stop=StopRequest())
    _stop_after(stopped, STOP_AT)
    with pytest.raises(Interrupted, match=f"SIGINT at step {STOP_AT}; checkpoint at") as info:
        stopped.run()
    assert info.value.checkpoint == str(tmp_path / "a" / "checkpoints" / f"step-{STOP_AT:08d}")
    # The periodic cut before it, as a run killed outright would have left it.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / f"step-{STOP_AT:08d}")

    for folder, step in (("a", STOP_AT), ("b", 10)):
        cut = latest_cut(tmp_path / folder / "checkpoints")
        assert cut is not None and cut.step == step
        if task != "charlm":  # the curriculum is mid-way through a window at the cut
            curriculum = load_stage(cut, 0, torch.device("cpu"))["task"]["curriculum"]
            assert curriculum["recent"] and curriculum["length"] < expected["final_length"]
        resumed = build_run(cfg, tmp_path / folder, resume=cut)
        summary = resumed.run()
        assert summary["steps"] == STEPS and summary["samples"] == (STEPS - step) * 8
        figures = ("train_loss", "test_bpc", "longest_solved", "final_length", "final_error_bits")
        assert {k: summary.get(k) for k in figures} == {k: expected.get(k) for k in figures}
        ours, theirs = resumed.learner.state_dict(), whole.learner.state_dict()
        assert len(_tensors(ours)) == len(_tensors(theirs)) > 0
        for a, b in zip(_tensors(ours), _tensors(theirs), strict=True):
            assert torch.equal(a, b)
    # Resumed where it stopped, the run's records are the uninterrupted run's, one for one.
    assert _records(tmp_path / "a") == _records(tmp_path / "whole")


def test_a_resumed_final_cut_still_reports_the_run(tmp_path: Path) -> None:
    """Resuming a run that had finished runs no step and reports what its end reported."""
    cfg = _cfg(tmp_path, "charlm", "dni")
    first = build_run(cfg, tmp_path).run()
    cut = latest_cut(tmp_path / "checkpoints")
    assert cut is not None and cut.step == STEPS
    again = build_run(cfg, tmp_path, resume=cut).run()
    for key in ("test_bpc", "train_loss", "steps"):
        assert again[key] == first[key] and first[key] is not None


@pytest.mark.parametrize(("poisoned_step", "last_good"), [(10, 5), (12, 10)])
def test_a_diverged_run_keeps_its_last_good_cut(
    tmp_path: Path, poisoned_step: int, last_good: int
) -> None:
    """A weight turned NaN by a cut's step (the cut is refused) or between cuts (the next
    loss is NaN): NonFiniteError, and the newest cut on disk is the finite one before."""
    run = build_run(_cfg(tmp_path, "copy", "dni"), tmp_path)
    original, done = run.step, 0

    def step() -> Any:
        nonlocal done
        out = original()
        done += 1
        if done == poisoned_step:
            with torch.no_grad():
                run.learner.core.readout.weight[0, 0] = float("nan")
        return out

    run.step = step  # type: ignore[method-assign]
    with pytest.raises(NonFiniteError, match="stage 0: non-finite"):
        run.run()
    cut = latest_cut(tmp_path / "checkpoints")
    assert cut is not None and cut.step == last_good
    state = load_stage(cut, 0, torch.device("cpu"))
    assert all(torch.isfinite(t).all() for t in _tensors(state["learner"]["core"]))


def _signal_once_training(metrics: Path, timeout_s: float = 60.0) -> threading.Thread:
    """SIGINT to this process once ``metrics`` holds a record (the run's handler is in place)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if metrics.is_file() and metrics.read_text().strip():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_cli_ctrl_c_then_resume_ends_as_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(ROOT / "configs" / "copy_dni.yaml")
    common = ["model.hidden=16", "data.batch_size=8", "train.log_every=5", "train.progress=false"]
    run_dir = tmp_path / "run"
    watcher = _signal_once_training(run_dir / "metrics.jsonl")
    # Far more steps than the signal needs to land: the run never races its own end.
    code = main(["train", config, *common, "train.steps=100000", "--out", str(run_dir)])
    watcher.join(5)
    err = capsys.readouterr().err
    assert code == 130, err
    assert "interrupted by SIGINT at step" in err and f"--resume {run_dir}" in err
    cut = latest_cut(run_dir / "checkpoints")
    assert cut is not None and cut.step >= 5
    steps = f"train.steps={cut.step + 7}"

    assert main(["train", config, *common, steps, "--resume", str(run_dir)]) == 0
    assert main(["train", config, *common, steps, "--out", str(tmp_path / "whole")]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == cut.step + 7 and summary["samples"] == 7 * 8
    ends = [latest_cut(d / "checkpoints") for d in (run_dir, tmp_path / "whole")]
    states = [load_stage(c, 0, torch.device("cpu"))["learner"] for c in ends if c is not None]
    assert len(states) == 2 and ends[0] is not None and ends[0].step == cut.step + 7
    for a, b in zip(_tensors(states[0]), _tensors(states[1]), strict=True):
        assert torch.equal(a, b)


def test_cli_refuses_to_resume_a_recurrent_run_with_another_alphabet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(ROOT / "configs" / "copy_dni.yaml")
    common = ["model.hidden=16", "train.steps=4", "train.progress=false"]
    assert main(["train", config, *common, "--out", str(tmp_path)]) == 0
    assert main(["train", config, *common, "recurrent.alphabet=5", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "recurrent.alphabet: checkpoint has 8, this run 5" in err and "Traceback" not in err
