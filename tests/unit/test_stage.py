"""DNI's stage logic on the method interface: the update-unlock, the targets, and equivalence
with backprop."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import pytest
import torch

from decoupled.build import build_stage, build_stages
from decoupled.config import Config
from decoupled.data import Dataset, TrainStream
from decoupled.local import LocalTrainer
from decoupled.methods import MethodStage
from decoupled.methods.dni import SynthesizerStage
from decoupled.stage import NonFiniteError, cross_entropy
from decoupled.synthesizer import Synthesizer
from tests.conftest import gpt_config, small_config, with_history


class OracleSynthesizer(Synthesizer):
    """A 'perfect' synthesizer: returns the true gradient the test computed for this step."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(shape, None)
        self.gradient: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        assert self.gradient is not None and self.gradient.shape == h.shape
        return self.gradient


def _true_output_gradients(
    stages: list[MethodStage], x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """∂L/∂h_i for every non-last stage, on copies (so batch-norm statistics are not touched)."""
    modules = [copy.deepcopy(s.module) for s in stages]
    outputs = []
    h = x
    for module in modules:
        h = module(h)
        outputs.append(h)
    return list(torch.autograd.grad(cross_entropy(h, y), outputs[:-1]))


def _workload(
    request: pytest.FixtureRequest, model: str
) -> tuple[Callable[[Sequence[str]], Config], Dataset]:
    """(config from overrides, data): the small FCN on digits, or the tiny GPT on text."""
    if model == "gpt":
        corpus = request.getfixturevalue("corpus")
        return functools.partial(gpt_config, corpus), request.getfixturevalue("text_windows")
    return small_config, request.getfixturevalue("digits")


def _params(stages: list[MethodStage]) -> list[torch.Tensor]:
    return [p.detach().clone() for s in stages for p in s.module.parameters()]


# The GPT with SGD: the gradient of its key bias is zero but for rounding (softmax ignores a
# shift shared by all keys), and Adam turns rounding noise into full-size steps.
@pytest.mark.parametrize(("model", "optim"), [("fcn", "adam"), ("fcn", "sgd"), ("gpt", "sgd")])
def test_perfect_sg_with_zero_delay_equals_backprop(
    request: pytest.FixtureRequest, model: str, optim: str
) -> None:
    config, data = _workload(request, model)
    cfg = config(["method.name=dni", "stages=3", f"optim.name={optim}", "optim.lr=0.01"])
    stages = build_stages(cfg, data.input_shape, data.num_classes)
    reference = build_stages(
        config(["method.name=backprop", f"optim.name={optim}", "optim.lr=0.01"]),
        data.input_shape,
        data.num_classes,
    )
    assert len(reference) == 1
    oracles = []
    for stage in stages[:-1]:
        assert isinstance(stage, SynthesizerStage)
        oracle = OracleSynthesizer(stage.synthesizer.activation_shape)
        stage.synthesizer = oracle
        oracles.append(oracle)
    stream = TrainStream(data.train_x, data.train_y, cfg.data.batch_size, seed=0)
    before = _params(stages)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(reference), strict=True))
    for seq in range(8):
        x, y = stream.batch(seq)
        for oracle, grad in zip(oracles, _true_output_gradients(stages, x, y), strict=True):
            oracle.gradient = grad
        h = x
        for stage in stages:
            sends = stage.forward(seq, h, y)
            h = sends.forward if sends.forward is not None else h
        reference[0].forward(seq, x, y)
    after, expected = _params(stages), _params(reference)
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    for a, b in zip(after, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bootstrapped_target_is_the_input_gradient_of_the_sg(digits: Dataset) -> None:
    """g_{i-1} = (∂h_i/∂h_{i-1})ᵀ δ̂_i: checked against autograd on a copy of the stage."""
    cfg = small_config(["method.name=dni", "stages=3"])
    stage = build_stage(cfg, 1, digits.input_shape, 10)
    assert isinstance(stage, SynthesizerStage)
    torch.nn.init.normal_(stage.synthesizer.output_layer.weight)  # a non-zero SG
    x = torch.randn(16, 32)
    y = torch.randint(0, 10, (16,))
    module = copy.deepcopy(stage.module)
    xr = x.clone().requires_grad_(True)
    hr = module(xr)
    with torch.no_grad():
        grad = stage.synthesizer(hr.detach(), y)
    (expected,) = torch.autograd.grad(hr, xr, grad)
    sends = stage.forward(0, x, y)
    assert sends.backward is not None
    torch.testing.assert_close(sends.backward, expected)


def test_zero_initialised_sg_leaves_weights_unchanged_on_first_step(digits: Dataset) -> None:
    cfg = small_config(["method.name=cdni", "stages=2"])
    stage = build_stage(cfg, 0, digits.input_shape, 10)
    x, y = digits.train_x[:32], digits.train_y[:32]
    before = _params([stage])
    sends = stage.forward(0, x, y)
    assert sends.backward is None  # the first stage has nobody to send a target to
    assert all(torch.equal(a, b) for a, b in zip(before, _params([stage]), strict=True))
    # ...whereas an SG that predicts something does move them (the check above can fail).
    assert isinstance(stage, SynthesizerStage)
    torch.nn.init.constant_(stage.synthesizer.output_layer.weight, 1e-3)
    stage.forward(1, x, y)
    assert not all(torch.equal(a, b) for a, b in zip(before, _params([stage]), strict=True))


@pytest.mark.parametrize("delay", [0, 3])
def test_target_staleness_equals_the_configured_delay(digits: Dataset, delay: int) -> None:
    cfg = small_config(["method.name=dni", "stages=3", f"method.delay={delay}", "train.steps=12"])
    trainer = LocalTrainer(cfg, digits)
    summary = trainer.run()
    for figures in summary["stages"][:-1]:
        assert figures["staleness_mean"] == delay
        assert figures["staleness_max"] == delay
        assert figures["sg_updates"] == 12 - delay  # the last `delay` targets are still in flight
        assert figures["sg_cosine"] is not None


def test_history_bound_expires_late_targets(digits: Dataset) -> None:
    # Refused by the config check in process; on actors a target can still arrive this late.
    cfg = small_config(["method.name=dni", "stages=2", "method.delay=5", "train.steps=10"])
    summary = LocalTrainer(with_history(cfg, 2), digits).run()
    first = summary["stages"][0]
    assert first["sg_updates"] == 0  # every target came back after its activation was evicted
    assert first["targets_expired"] == 5


@pytest.mark.parametrize(
    ("model", "micro", "batch_norm"), [("fcn", 1, True), ("fcn", 4, False), ("gpt", 4, False)]
)
def test_pipeline_equals_backprop(
    request: pytest.FixtureRequest, model: str, micro: int, batch_norm: bool
) -> None:
    """GPipe's micro-batched true gradients are backprop's (BN aside: it sees smaller batches);
    for the GPT, the mean over every token of the batch."""
    config, data = _workload(request, model)
    common = [f"model.batch_norm={str(batch_norm).lower()}", "train.steps=6", "optim.lr=0.01"]
    if model == "gpt":
        common.append("optim.name=sgd")  # Adam and the key bias: see the test above
    pipe = LocalTrainer(
        config(["method.name=pipeline", "stages=3", f"method.micro_batches={micro}", *common]),
        data,
    )
    ref = LocalTrainer(config(["method.name=backprop", *common]), data)
    pipe.run()
    ref.run()
    for a, b in zip(_params(pipe.stages), _params(ref.stages), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_activation_stops_with_a_clear_error(digits: Dataset) -> None:
    stage = build_stage(small_config(["method.name=dni", "stages=2"]), 0, digits.input_shape, 10)
    x = digits.train_x[:8].clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="stage 0: non-finite activation at step 7"):
        stage.forward(7, x, digits.train_y[:8])


def test_infinite_target_stops_before_the_synthesizer_moves(digits: Dataset) -> None:
    stage = build_stage(small_config(["method.name=dni", "stages=2"]), 0, digits.input_shape, 10)
    sends = stage.forward(3, digits.train_x[:8], digits.train_y[:8])
    assert sends.forward is not None and isinstance(stage, SynthesizerStage)
    before = [p.detach().clone() for p in stage.synthesizer.parameters()]
    target = torch.zeros_like(sends.forward)
    target[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="stage 0: non-finite SG loss at step 3"):
        stage.backward(3, target)
    for p, b in zip(stage.synthesizer.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_synthesizer_trains_on_every_nth_target_only(digits: Dataset) -> None:
    cfg = small_config(
        ["method.name=cdni", "stages=2", "method.sg.train_every=3", "train.steps=12"]
    )
    summary = LocalTrainer(cfg, digits).run()
    first = summary["stages"][0]
    assert first["sg_updates"] == 4  # steps 0, 3, 6, 9
    assert first["targets_expired"] == 0  # the others are skipped, not lost


@pytest.mark.parametrize("fused", [False, True])
def test_optim_fused_reaches_the_synthesizer(digits: Dataset, fused: bool) -> None:
    cfg = small_config(["method.name=dni", "stages=2", f"optim.fused={fused}"])
    stage = build_stage(cfg, 0, digits.input_shape, 10)
    assert isinstance(stage, SynthesizerStage)
    assert bool(stage.sg_optimizer.defaults["fused"]) is fused
    assert bool(stage.stage.optimizer.optimizer.defaults["fused"]) is fused
