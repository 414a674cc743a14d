"""Checkpoint cuts: atomic files sealed by a manifest, verification, and exact resume."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decoupled.checkpoint import (
    CheckpointError,
    Cut,
    check_compatible,
    commit_cut,
    complete_steps,
    latest_cut,
    load_stage,
    save_stage,
)
from decoupled.config import config_to_dict
from decoupled.data import Dataset
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.local import LocalTrainer
from decoupled.methods import METHODS
from tests.conftest import DIGITS_CONFIG, small_config

CPU = torch.device("cpu")


def _write_cut(root: Path, step: int, stages: int = 2) -> None:
    for i in range(stages):
        save_stage(root, step, i, {"w": torch.full((3,), float(step + i))}, CPU)
    commit_cut(root, step, stages, {"seed": 0}, keep=2)


def test_a_cut_without_its_manifest_is_not_a_cut(tmp_path: Path) -> None:
    save_stage(tmp_path, 10, 0, {"w": torch.zeros(2)}, CPU)  # stage 1 never wrote: no manifest
    assert complete_steps(tmp_path) == [] and latest_cut(tmp_path) is None
    with pytest.raises(CheckpointError, match=r"stage-1\.pt is missing"):
        commit_cut(tmp_path, 10, 2, {}, keep=2)


def test_round_trip_and_only_the_newest_cuts_are_kept(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _write_cut(tmp_path, step)
    assert complete_steps(tmp_path) == [20, 30]
    cut = latest_cut(tmp_path)
    assert cut is not None and cut.step == 30 and cut.num_stages == 2
    assert torch.equal(load_stage(cut, 1, CPU)["w"], torch.full((3,), 31.0))


def test_truncated_stage_file_is_refused_naming_it(tmp_path: Path) -> None:
    _write_cut(tmp_path, 10)
    stage_file = tmp_path / "step-00000010" / "stage-1.pt"
    stage_file.write_bytes(stage_file.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"stage-1\.pt: truncated or altered"):
        latest_cut(tmp_path)


def test_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    cut_dir = tmp_path / "step-00000005"
    cut_dir.mkdir()
    (cut_dir / "manifest.json").write_text(json.dumps({"format": "someone-else/3"}))
    with pytest.raises(CheckpointError, match="not a decoupled-checkpoint/1 checkpoint"):
        latest_cut(tmp_path)
    torch.save({"weights": 1}, cut_dir / "stage-0.pt")
    (cut_dir / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        latest_cut(tmp_path)


def test_incompatible_configuration_is_named(tmp_path: Path) -> None:
    cfg = small_config(["method.name=dni", "stages=2"])
    _write_cut(tmp_path, 10)
    cut = latest_cut(tmp_path)
    assert cut is not None
    other = config_to_dict(small_config(["method.name=dni", "stages=2", "model.hidden=48"]))
    cut = type(cut)(cut.path, cut.step, cut.num_stages, config_to_dict(cfg))
    with pytest.raises(CheckpointError, match=r"model: checkpoint has .*'hidden': 32"):
        check_compatible(cut, other, 2)


def test_a_key_added_since_the_cut_takes_its_default() -> None:
    """A cut written before a config key existed (here ``method.sg.zero_start``) resumes under
    the key's default, which is how it was trained; under another value it is refused."""
    now = config_to_dict(small_config(["method.name=cdni", "stages=2"]))
    before = copy.deepcopy(now)
    del before["method"]["sg"]["zero_start"]
    cut = Cut(Path("step-00000010"), 10, 2, before)
    check_compatible(cut, now, 2)
    other = config_to_dict(
        small_config(["method.name=cdni", "stages=2", "method.sg.zero_start=false"])
    )
    with pytest.raises(CheckpointError, match=r"method.sg: checkpoint has .*'zero_start': True"):
        check_compatible(cut, other, 2)


def _params(trainer: LocalTrainer) -> list[torch.Tensor]:
    return [t for s in trainer.stages for t in s.module.state_dict().values()]


@pytest.mark.parametrize(
    "method", sorted(name for name, method in METHODS.items() if not method.replicas)
)
def test_resume_continues_exactly_where_the_uninterrupted_run_goes(
    digits: Dataset, tmp_path: Path, method: str
) -> None:
    """Half a run, a cut, a new trainer from the cut: the same parameters as one whole run
    (delay 0: no target is in flight at a step boundary, so the cut loses nothing)."""
    common = [f"method.name={method}", "stages=3", "train.steps=40", "checkpoint.every=20"]
    for name in ("whole", "a"):
        (tmp_path / name).mkdir()
    whole = LocalTrainer(small_config(common), digits, tmp_path / "whole")
    whole.run()
    first = LocalTrainer(small_config([*common[:-2], "train.steps=20"]), digits, tmp_path / "a")
    first.run()
    cut = latest_cut(tmp_path / "a" / "checkpoints")
    assert cut is not None and cut.step == 20
    second = LocalTrainer(small_config(common), digits, tmp_path / "a", resume=cut)
    summary = second.run()
    assert summary["steps"] == 40
    for a, b in zip(_params(second), _params(whole), strict=True):
        assert torch.equal(a, b)


def test_stop_request_writes_a_cut_then_raises(digits: Dataset, tmp_path: Path) -> None:
    stop = StopRequest()
    trainer = LocalTrainer(small_config(["train.steps=50"]), digits, tmp_path, stop=stop)
    original = trainer.step

    def step_then_signal(seq: int, x: torch.Tensor, y: torch.Tensor) -> None:
        original(seq, x, y)
        if seq == 11:
            stop.signum = signal.SIGINT  # what the handler does on Ctrl-C

    trainer.step = step_then_signal  # type: ignore[method-assign]
    with pytest.raises(Interrupted, match="SIGINT at step 12") as info:
        trainer.run()
    assert info.value.checkpoint is not None
    cut = latest_cut(tmp_path / "checkpoints")
    assert cut is not None and cut.step == 12


def test_cli_refuses_a_truncated_checkpoint_on_resume(tmp_path: Path) -> None:
    run = [
        sys.executable,
        "-m",
        "decoupled.cli",
        "train",
        str(DIGITS_CONFIG),
        "runtime.backend=local",
        "train.steps=20",
        "checkpoint.every=10",
        "train.progress=false",
    ]
    assert (
        subprocess.run([*run, "--out", str(tmp_path)], capture_output=True, timeout=120).returncode
        == 0
    )
    stage_file = tmp_path / "checkpoints" / "step-00000020" / "stage-0.pt"
    stage_file.write_bytes(stage_file.read_bytes()[:-10])
    result = subprocess.run(
        [*run, "--resume", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "stage-0.pt: truncated or altered" in result.stderr
    assert "Traceback" not in result.stderr


def _adam_stage_state() -> tuple[torch.nn.Module, dict[str, object]]:
    """A module and its Adam optimizer after one step, as a stage's state dict holds them."""
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    return module, {"module": module.state_dict(), "optimizer": optimizer.state_dict()}


def test_load_returns_host_tensors_whatever_the_device(tmp_path: Path) -> None:
    """``load_state_dict`` places tensors; ``load_stage`` must not (a meta device would keep
    them from ever holding data, as a CUDA device would put Adam's step on the GPU)."""
    _, state = _adam_stage_state()
    save_stage(tmp_path, 5, 0, state, CPU)
    commit_cut(tmp_path, 5, 1, {}, keep=1)
    cut = latest_cut(tmp_path)
    assert cut is not None
    loaded = load_stage(cut, 0, torch.device("meta"))
    tensors = [*loaded["module"].values()]
    for param_state in loaded["optimizer"]["state"].values():
        tensors += [value for value in param_state.values() if isinstance(value, torch.Tensor)]
    assert len(tensors) == 2 + 2 * 3  # weight and bias; step, exp_avg, exp_avg_sq for each
    assert {t.device.type for t in tensors} == {"cpu"}

    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.load_state_dict(loaded["module"])
    optimizer.load_state_dict(loaded["optimizer"])
    steps = [optimizer.state[p]["step"] for p in module.parameters()]
    assert [float(step) for step in steps] == [1.0, 1.0]
    assert all(step.device.type == "cpu" for step in steps)


def test_to_cpu_keeps_the_structure_and_detaches() -> None:
    from collections import namedtuple

    from decoupled.checkpoint import to_cpu

    Pair = namedtuple("Pair", "a b")
    weight = torch.ones(2, requires_grad=True)
    state = {"w": weight * 2, "nested": [Pair(torch.zeros(1), 3), (torch.ones(1), "x")], "n": 7}
    moved = to_cpu(state)
    assert not moved["w"].requires_grad and torch.equal(moved["w"], torch.full((2,), 2.0))
    assert isinstance(moved["nested"], list) and isinstance(moved["nested"][0], Pair)
    assert moved["nested"][0].b == 3 and moved["nested"][1][1] == "x"
    assert isinstance(moved["nested"][1], tuple) and moved["n"] == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cut_written_on_a_gpu_resumes_with_adams_step_on_the_host(tmp_path: Path) -> None:
    from decoupled.checkpoint import to_cpu

    device = torch.device("cuda", 0)
    module = torch.nn.Linear(3, 2).to(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module(torch.ones(4, 3, device=device)).sum().backward()
    optimizer.step()
    state = {"module": module.state_dict(), "optimizer": optimizer.state_dict()}
    assert {t.device.type for t in to_cpu(state)["module"].values()} == {"cpu"}
    save_stage(tmp_path, 5, 0, state, device)
    commit_cut(tmp_path, 5, 1, {}, keep=1)
    cut = latest_cut(tmp_path)
    assert cut is not None
    loaded = load_stage(cut, 0, device)
    assert {t.device.type for t in loaded["module"].values()} == {"cpu"}  # the file's tensors

    resumed = torch.nn.Linear(3, 2).to(device)
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    resumed.load_state_dict(loaded["module"])
    resumed_optimizer.load_state_dict(loaded["optimizer"])
    for param in resumed.parameters():
        assert param.device == device
        param_state = resumed_optimizer.state[param]
        assert param_state["exp_avg"].device == device
        assert param_state["step"].device.type == "cpu"  # no sync per parameter per step
    resumed(torch.ones(4, 3, device=device)).sum().backward()
    resumed_optimizer.step()
    assert [float(resumed_optimizer.state[p]["step"]) for p in resumed.parameters()] == [2.0, 2.0]
