"""The synthetic-gradient probe: the exact gradient at every stage boundary, through the same
messages as training, compared with each stage's synthetic gradient; nothing is updated."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from decoupled.data import Dataset, TrainStream
from decoupled.local import LocalTrainer
from decoupled.methods import MethodStage
from tests.conftest import small_config
from tests.unit.test_runner import run_threads

PROBE = ["method.sg.probe_every=5", "train.steps=10", "stages=3"]


def _exact_gradients(
    stages: list[MethodStage], x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """∂L/∂h_i of the whole model at its current weights (training-mode batch norm), by
    autograd on copies."""
    modules = [copy.deepcopy(s.module).train() for s in stages]
    outputs, h = [], x
    for module in modules:
        h = module(h)
        outputs.append(h)
    return list(torch.autograd.grad(F.cross_entropy(h, y), outputs[:-1]))


def _check(stages: list[MethodStage], digits: Dataset) -> None:
    # The last probe went after step 10 on batch 9, at the final weights.
    x, y = TrainStream(digits.train_x, digits.train_y, 64, seed=0).batch(9)
    exact = _exact_gradients(stages, x, y)
    for stage, grad in zip(stages[:-1], exact, strict=True):
        assert stage.probe_gradient is not None
        torch.testing.assert_close(stage.probe_gradient, grad, rtol=1e-4, atol=1e-7)
        figures = stage.stats.run_figures()
        assert -1.0 <= figures["sg_true_cosine"] <= 1.0
        assert figures["sg_true_rel_error"] >= 0.0


@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_in_process_probe_gradient_is_autograds(digits: Dataset, method: str) -> None:
    trainer = LocalTrainer(small_config([f"method.name={method}", *PROBE]), digits)
    before = [b.clone() for s in trainer.stages for b in s.module.buffers()]
    trainer.run()
    _check(trainer.stages, digits)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            before, [b for s in trainer.stages for b in s.module.buffers()], strict=True
        )
    )  # training moved the batch-norm statistics, which the check above does not hide


def test_probe_changes_nothing_it_measures(digits: Dataset) -> None:
    """The same run with and without probes ends with the same weights and statistics."""
    probed = LocalTrainer(small_config(["method.name=cdni", *PROBE]), digits)
    plain = LocalTrainer(
        small_config(["method.name=cdni", *PROBE, "method.sg.probe_every=0"]), digits
    )
    probed.run()
    plain.run()
    for a, b in zip(probed.stages, plain.stages, strict=True):
        for name, value in a.state_dict()["module"].items():
            assert torch.equal(value, b.state_dict()["module"][name]), name


def test_stage_loop_probe_gradient_is_autograds(digits: Dataset) -> None:
    """Through the actors' loop over bounded channels (as on Ray), in lockstep."""
    runners = run_threads(
        small_config(["method.name=cdni", *PROBE, "runtime.backend=ray", "runtime.lockstep=true"]),
        digits,
    )
    _check([r.stage for r in runners], digits)
    assert runners[0].poll().figures["sg_true_cosine"] is not None


def test_the_probe_reports_its_cost(digits: Dataset) -> None:
    """summary.json's probe_s: the time each stage spent on probe batches, zero without them."""
    common = ["method.name=cdni", "stages=2", "train.steps=20", "runtime.gpus_per_stage=0"]
    probed = LocalTrainer(small_config([*common, "method.sg.probe_every=5"]), digits).run()
    plain = LocalTrainer(small_config([*common, "method.sg.probe_every=0"]), digits).run()
    assert all(s["probe_s"] > 0 for s in probed["stages"])
    assert all(s["probe_s"] == 0 for s in plain["stages"])
