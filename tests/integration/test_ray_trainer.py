"""The distributed trainer on a real local Ray cluster: accuracy, equivalence, bounds."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from decoupled.checkpoint import latest_cut, load_stage
from decoupled.config import Config
from decoupled.data import Dataset
from decoupled.local import LocalTrainer
from decoupled.methods import METHODS
from decoupled.ray_runtime.controller import train_on_ray
from tests.conftest import digits_config, gpt_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]

_local_accuracy: dict[tuple[int, str], float] = {}
EPOCHS = 5
# The in-process references run on the host like the actors of this CPU-only cluster, also on a
# machine with a GPU (where "auto" would put them on it).
HOST = ("runtime.backend=local", "runtime.gpus_per_stage=0")


def _local(digits: Dataset, stages: int, method: str, common: list[str]) -> float:
    key = (stages, method)
    if key not in _local_accuracy:
        cfg = digits_config(*common, *HOST)
        _local_accuracy[key] = LocalTrainer(cfg, digits).run()["test_accuracy"]
    return _local_accuracy[key]


@pytest.mark.parametrize("transport", ["torch", "ray"])
@pytest.mark.parametrize("method", ["dni", "cdni"])
@pytest.mark.parametrize("stages", [2, 3])
def test_actors_reach_the_in_process_accuracy(
    digits: Dataset, tmp_path: Path, stages: int, method: str, transport: str
) -> None:
    # Five epochs: a run's cost is mostly its actors' start-up, and the margin over the
    # tolerance held (at least +0.029 in all eight cases at five epochs, +0.02 at ten).
    common = [f"method.name={method}", f"stages={stages}", f"train.epochs={EPOCHS}"]
    cfg = digits_config(*common, f"runtime.transport={transport}")
    summary = train_on_ray(cfg, digits, tmp_path)
    expected = _local(digits, stages, method, common)
    assert summary["test_accuracy"] >= expected - 0.04, (summary["test_accuracy"], expected)
    assert summary["transport"] == ("ray" if transport == "ray" else "torch-gloo")
    assert [s["index"] for s in summary["stages"]] == list(range(stages))
    for figures in summary["stages"]:
        assert figures["steps"] == summary["steps"]
        assert 0 < figures["busy_fraction"] <= 1
        assert figures["device"] == "cpu"
    for figures in summary["stages"][:-1]:
        assert figures["sg_updates"] > 0 and figures["staleness_mean"] is not None
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "eval" for r in evals) == EPOCHS


def _states(cfg: Config, digits: Dataset, out: Path) -> list[dict[str, Any]]:
    """Every stage's state at the end of a run on actors, read from the run's last cut."""
    train_on_ray(cfg, digits, out)
    cut = latest_cut(out / "checkpoints")
    assert cut is not None
    return [load_stage(cut, i, torch.device("cpu")) for i in range(cut.num_stages)]


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A stage state's tensors by dotted name (module, synthesizers, heads...), optimizers aside."""
    return {
        f"{part}.{name}": value
        for part, values in state.items()
        if "optimizer" not in part and isinstance(values, dict)
        for name, value in values.items()
        if isinstance(value, torch.Tensor)
    }


@pytest.mark.parametrize("transport", ["torch", "ray"])
@pytest.mark.parametrize("method", sorted(n for n, m in METHODS.items() if not m.replicas))
def test_lockstep_actors_reproduce_the_in_process_trainer(
    digits: Dataset, tmp_path: Path, method: str, transport: str
) -> None:
    """Every method's objects, driven by actors in lockstep or by the in-process trainer, end
    with the same state; GPipe's is also backprop's. Evaluations every other step reach the
    driver several per poll, each stamped with the time it was done."""
    common = [
        f"method.name={method}",
        "stages=3",
        "method.micro_batches=4",
        "train.steps=20",
        "model.hidden=64",
        "model.batch_norm=false",  # GPipe equals backprop only without batch statistics
        "optim.lr=0.01",
    ]
    cfg = digits_config(
        *common, "runtime.lockstep=true", f"runtime.transport={transport}", "train.eval_every=2"
    )
    states = _states(cfg, digits, tmp_path)
    local = LocalTrainer(digits_config(*common, *HOST), digits)
    _one_thread_reference(local)
    assert len(states) == len(local.stages)
    for state, stage in zip(states, local.stages, strict=True):
        actual, expected = _tensors(state), _tensors(stage.state_dict())
        assert actual.keys() == expected.keys() and expected
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)
    if method == "pipeline":
        ref = LocalTrainer(digits_config(*common, "method.name=backprop", *HOST), digits)
        _one_thread_reference(ref)
        actual_values = [v for state in states for v in state["module"].values()]
        expected_values = list(ref.stages[0].state_dict()["module"].values())
        assert len(actual_values) == len(expected_values)
        for a, b in zip(actual_values, expected_values, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == list(range(2, 21, 2))
    times = [r["wall_s"] for r in evals]
    assert all(a < b for a, b in itertools.pairwise(times)), times


def test_ddp_replicas_equal_backprop_on_the_global_batch(digits: Dataset, tmp_path: Path) -> None:
    """Two replicas, each on half of every batch, gradients all-reduced: backprop's update on
    the whole batch, on both replicas; the last one evaluates."""
    common = ["train.steps=12", "model.hidden=64", "model.batch_norm=false", "optim.lr=0.01"]
    cfg = digits_config(*common, "method.name=ddp", "stages=2", "train.eval_every=6")
    states = _states(cfg, digits, tmp_path)
    ref = LocalTrainer(digits_config(*common, "method.name=backprop", *HOST), digits)
    _one_thread_reference(ref)
    expected = _tensors(ref.stages[0].state_dict())
    assert len(states) == 2
    for state in states:
        actual = _tensors(state)
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [6, 12]


def test_the_gpt_on_actors_reproduces_the_in_process_trainer(
    corpus: Path, text_windows: Dataset, tmp_path: Path
) -> None:
    """Token windows, (B, T) labels on the wire, per-token cDNI synthesizers on (B, T, D)
    activations: the actors in lockstep end where the in-process trainer does, and report the
    held-out bits per character."""
    common = ["method.name=cdni", "stages=2", "train.steps=8", "optim.name=sgd", "optim.lr=0.05"]
    cfg = gpt_config(corpus, [*common, "runtime.backend=ray", "runtime.lockstep=true"])
    summary = train_on_ray(cfg, text_windows, tmp_path)
    cut = latest_cut(tmp_path / "checkpoints")
    assert cut is not None
    states = [load_stage(cut, i, torch.device("cpu")) for i in range(cut.num_stages)]
    local = LocalTrainer(gpt_config(corpus, common), text_windows)
    _one_thread_reference(local)
    for state, stage in zip(states, local.stages, strict=True):
        actual, expected = _tensors(state), _tensors(stage.state_dict())
        assert actual.keys() == expected.keys() and expected
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert summary["test_bpc"] == pytest.approx(summary["test_loss"] / math.log(2))
    assert summary["stages"][0]["sg_updates"] == 8


def _one_thread_reference(local: LocalTrainer) -> None:
    # The actors run one torch thread each (runtime.cpus_per_stage=1). Another thread count
    # reorders float reductions, and Adam turns that noise on the near-zero early synthetic
    # gradients into lr-sized steps: equal thread counts are part of "the same computation".
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local.run()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("transport", ["torch", "ray"])
def test_slow_stage_with_channels_of_one_stays_bounded(
    digits: Dataset, tmp_path: Path, transport: str
) -> None:
    """Stage 1 holds four 512-wide blocks, stages 0 and 2 one small block each: stage 0 is
    throttled by backpressure, nothing deadlocks, and no actor's memory grows."""
    cfg = digits_config(
        "method.name=cdni",
        "stages=3",
        "model.layers=6",
        "model.hidden=512",
        "model.boundaries=[1,5]",
        "runtime.channel_capacity=1",
        "method.sg.history=8",
        "train.steps=400",
        "train.log_every=20",
        f"runtime.transport={transport}",
    )
    summary = train_on_ray(cfg, digits, tmp_path)
    assert summary["steps"] == 400
    first, slow, last = summary["stages"]
    assert slow["busy_fraction"] > first["busy_fraction"]
    assert last["input_wait_s"] > slow["input_wait_s"]  # the stage after the slow one waits
    for figures in summary["stages"]:
        assert figures["channel_depth"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train" and "stage0/rss_mb" in r]
    assert len(train) >= 6
    for i in range(3):
        early = train[len(train) // 3][f"stage{i}/rss_mb"]
        late = train[-1][f"stage{i}/rss_mb"]
        assert late - early < 25, f"stage {i} grew from {early:.0f} MB to {late:.0f} MB"
