"""Stage runners on threads over in-process channels: the actor loop without Ray."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from decoupled.build import build_stages
from decoupled.channel import LocalChannel, Policy
from decoupled.config import Config
from decoupled.data import Dataset, TrainStream, eval_batches
from decoupled.local import LocalTrainer
from decoupled.methods import method_for
from decoupled.methods.dni import SynthesizerStage
from decoupled.runner import RunnerSettings, StageRunner
from decoupled.schedule import Schedule
from tests.conftest import small_config


def run_threads(cfg: Config, digits: Dataset, capacity: int = 2) -> list[StageRunner]:
    """K runners wired like the actors are, each on its own thread, run to the end."""
    stages = build_stages(cfg, digits.input_shape, digits.num_classes)
    stream = TrainStream(digits.train_x, digits.train_y, cfg.data.batch_size, cfg.seed)
    settings = RunnerSettings(
        schedule=Schedule.from_config(cfg.train, stream.steps_per_epoch),
        micro_batches=method_for(cfg).micro_batches(),
        probe_every=method_for(cfg).probe_every(),
        lockstep=cfg.runtime.lockstep,
        send_timeout_s=30,
    )
    k = len(stages)
    forward = [LocalChannel(capacity, Policy.BLOCK) for _ in range(k - 1)]
    backward = [
        LocalChannel(max(capacity, cfg.method.micro_batches), Policy.DROP_OLDEST)
        for _ in range(k - 1)
    ]

    def dropped(i: int) -> Callable[[], int]:
        return (lambda: backward[i].dropped) if i < k - 1 else (lambda: 0)

    runners = []
    for i, stage in enumerate(stages):
        edges: dict[str, Any] = {}
        if i > 0:
            edges.update(forward_in=forward[i - 1], backward_out=backward[i - 1])
        if i < k - 1:
            edges.update(forward_out=forward[i], backward_in=backward[i])
        runners.append(
            StageRunner(
                stage,
                settings,
                stream=stream if i == 0 else None,
                test=(lambda: eval_batches(digits.test_x, digits.test_y, 128)) if i == 0 else None,
                num_test_samples=digits.test_y.shape[0],
                dropped_targets=dropped(i),
                **edges,
            )
        )
    for runner in runners:
        runner.start()
    for runner in runners:
        assert runner.join(timeout=120), f"stage {runner.stage.index} did not finish"
        assert runner.error is None, runner.error
    return runners


def _params(stages: list[Any]) -> list[torch.Tensor]:
    return [p.detach() for s in stages for p in s.module.parameters()]


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_lockstep_threads_reproduce_the_local_trainer(digits: Dataset, method: str) -> None:
    common = [f"method.name={method}", "stages=3", "train.steps=25", "train.eval_every=10"]
    # The runner is the Ray backend's stage loop, run here on threads.
    ray_cfg = small_config([*common, "runtime.backend=ray", "runtime.lockstep=true"])
    runners = run_threads(ray_cfg, digits)
    local = LocalTrainer(small_config([*common, "method.delay=0"]), digits)
    local.run()
    for a, b in zip(_params([r.stage for r in runners]), _params(local.stages), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for runner, stage in zip(runners[:-1], local.stages[:-1], strict=True):
        assert isinstance(stage, SynthesizerStage) and isinstance(runner.stage, SynthesizerStage)
        for a, b in zip(
            runner.stage.synthesizer.parameters(), stage.synthesizer.parameters(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Evaluations flowed through the stages: after steps 10, 20 and at the end (25).
    assert [e.step for e in runners[-1].poll().evals] == [10, 20, 25]


def test_asynchronous_threads_learn_and_keep_bounds(digits: Dataset) -> None:
    cfg = small_config(["method.name=cdni", "stages=3", "train.epochs=8", "model.hidden=64"])
    runners = run_threads(cfg, digits, capacity=1)
    evals = runners[-1].poll().evals
    assert len(evals) == 8
    assert evals[-1].test_accuracy > 0.85
    for runner in runners:
        figures = runner.final_figures()
        assert figures["steps"] == 8 * (1438 // 64)
        assert figures["history"] <= cfg.method.sg.history
    assert runners[0].final_figures()["sg_updates"] > 0


def test_pipeline_threads_equal_backprop(digits: Dataset) -> None:
    common = ["model.batch_norm=false", "train.steps=6", "optim.lr=0.01"]
    runners = run_threads(
        small_config(["method.name=pipeline", "stages=3", "method.micro_batches=4", *common]),
        digits,
    )
    ref = LocalTrainer(small_config(["method.name=backprop", *common]), digits)
    ref.run()
    for a, b in zip(_params([r.stage for r in runners]), _params(ref.stages), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
