"""The method interface as a whole: every method runs on both drivers alike, the interface's
promises (scale applied once, builds that leave the caller's RNG alone) hold for all."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

from decoupled.build import build_stages
from decoupled.config import METHODS as METHOD_NAMES
from decoupled.config import REPLICA_METHODS, Config
from decoupled.data import Dataset, TrainStream
from decoupled.local import LocalTrainer
from decoupled.methods import METHODS, MethodStage
from decoupled.methods.dni import SynthesizerStage
from decoupled.synthesizer import Synthesizer
from tests.conftest import gpt_config, small_config
from tests.unit.test_runner import run_threads

CHAINS = sorted(name for name, method in METHODS.items() if not method.replicas)


def test_every_configurable_method_is_registered() -> None:
    assert sorted(METHODS) == sorted(METHOD_NAMES)
    assert sorted(REPLICA_METHODS) == sorted(n for n, m in METHODS.items() if m.replicas)


def _params(stages: list[MethodStage]) -> list[torch.Tensor]:
    return [p.detach().clone() for s in stages for p in s.module.parameters()]


def _state_tensors(stage: MethodStage) -> list[torch.Tensor]:
    """Every tensor a stage's state holds (module, synthesizers, heads...), optimizers aside."""
    return [
        value
        for part, values in stage.state_dict().items()
        if "optimizer" not in part and isinstance(values, dict)
        for value in values.values()
        if isinstance(value, torch.Tensor)
    ]


@pytest.mark.parametrize(
    ("model", "method"),
    [*(("fcn", m) for m in CHAINS), ("gpt", "cdni"), ("gpt", "pipeline"), ("gpt", "dgl")],
)
def test_lockstep_loop_equals_the_in_process_trainer(
    request: pytest.FixtureRequest, model: str, method: str
) -> None:
    """The same method objects, driven by K stage loops on threads over bounded channels in
    lockstep or by the in-process trainer, end with the same state (and, for the GPT's
    per-token labels, the same evaluation)."""
    config: Callable[[Sequence[str]], Config] = small_config
    if model == "gpt":
        config = functools.partial(gpt_config, request.getfixturevalue("corpus"))
        data = request.getfixturevalue("text_windows")
    else:
        data = request.getfixturevalue("digits")
    common = [f"method.name={method}", "stages=3", "train.steps=12", "method.micro_batches=2"]
    # The runner is the Ray backend's stage loop, run here on threads.
    ray_cfg = config([*common, "runtime.backend=ray", "runtime.lockstep=true"])
    runners = run_threads(ray_cfg, data)
    local = LocalTrainer(config(common), data)
    summary = local.run()
    if model == "gpt":
        (result,) = runners[-1].figures.evals
        assert result.test_loss == pytest.approx(summary["test_loss"], rel=1e-5)
        assert result.test_accuracy == pytest.approx(summary["test_accuracy"])
    assert len(runners) == len(local.stages)
    for runner, stage in zip(runners, local.stages, strict=True):
        actual, expected = _state_tensors(runner.stage), _state_tensors(stage)
        assert len(actual) == len(expected) > 0
        for a, b in zip(actual, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class OracleSynthesizer(Synthesizer):
    """Predicts exactly the gradient the test computed for this step."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(shape, None)
        self.gradient = torch.zeros(0)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.gradient


def test_sg_scale_multiplies_every_stage_update_exactly_once(digits: Dataset) -> None:
    """With exact synthetic gradients and plain SGD, scale s makes every non-last stage's update
    s times backprop's (not s^(K-1-i)), and the targets sent back are unscaled gradients."""
    sgd = ["optim.name=sgd", "optim.momentum=0", "optim.lr=0.1"]
    stages = build_stages(
        small_config(["method.name=dni", "stages=3", "method.sg.scale=0.5", *sgd]),
        digits.input_shape,
        digits.num_classes,
    )
    (reference,) = build_stages(
        small_config(["method.name=backprop", *sgd]), digits.input_shape, digits.num_classes
    )
    x, y = TrainStream(digits.train_x, digits.train_y, 64, seed=0).batch(0)
    # True ∂L/∂h_i of the current weights, on copies (batch-norm statistics untouched).
    modules = [copy.deepcopy(s.module) for s in stages]
    outputs, h = [], x
    for module in modules:
        h = module(h)
        outputs.append(h)
    true_grads = torch.autograd.grad(F.cross_entropy(h, y), outputs[:-1])
    for stage, grad in zip(stages[:-1], true_grads, strict=True):
        assert isinstance(stage, SynthesizerStage)
        oracle = OracleSynthesizer(stage.synthesizer.activation_shape)
        oracle.gradient = grad
        stage.synthesizer = oracle
    before = [_params([s]) for s in stages]
    targets = []
    h = x
    for stage in stages:
        sends = stage.forward(0, h, y)
        targets.append(sends.backward)
        h = sends.forward if sends.forward is not None else h
    ref_before = _params([reference])
    reference.forward(0, x, y)
    ref_delta = [a - b for a, b in zip(_params([reference]), ref_before, strict=True)]
    deltas = [
        a - b
        for s, old in zip(stages, before, strict=True)
        for a, b in zip(_params([s]), old, strict=True)
    ]
    factors = [0.5] * sum(len(b) for b in before[:-1]) + [1.0] * len(before[-1])
    assert len(deltas) == len(ref_delta) == len(factors)
    for delta, expected, factor in zip(deltas, ref_delta, factors, strict=True):
        torch.testing.assert_close(delta, factor * expected, rtol=1e-4, atol=1e-7)
    # Stage i+1 sends back the gradient estimate for h_i itself, not scale times it.
    for target, grad in zip(targets[1:], true_grads, strict=True):
        assert target is not None
        torch.testing.assert_close(target, grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_building_stages_leaves_the_global_rng_alone(digits: Dataset, method: str) -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    # Replicas run on actors only; building them needs no process group yet.
    cfg = small_config([f"method.name={method}", "stages=2", "runtime.backend=ray"])
    stages = build_stages(cfg, digits.input_shape, 10)
    assert torch.equal(torch.get_rng_state(), state)
    # ...and the build still depends on the configured seed alone.
    torch.manual_seed(99)
    again = build_stages(cfg, digits.input_shape, 10)
    for a, b in zip(_params(stages), _params(again), strict=True):
        assert torch.equal(a, b)
