"""What a stage's optimizer does beyond torch's: schedules, AdamW, clipping, accumulation and
per-stage settings, each checked against a direct computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decoupled.build import build_stages
from decoupled.config import ConfigError, OptimConfig, parse_config
from decoupled.data import Dataset
from decoupled.local import LocalTrainer
from decoupled.optim import StageOptimizer, build_optimizer, lr_factor
from tests.conftest import small_config


def _optim(*overrides: str) -> OptimConfig:
    return parse_config({}, [f"optim.{o}" for o in overrides]).optim


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        (0, 0.25),  # warm-up over 4 updates: 1/4, 2/4, 3/4, 4/4
        (2, 0.75),
        (3, 1.0),
        (4, 1.0),  # the cosine over the remaining 100 starts at 1...
        (54, 0.1 + 0.9 * 0.5),  # ...is halfway down at their middle...
        (104, 0.1),  # ...reaches the floor at the end of the run...
        (500, 0.1),  # ...and stays there
    ],
)
def test_warmup_then_cosine(update: int, expected: float) -> None:
    cfg = _optim("schedule=cosine", "warmup_steps=4", "min_lr_ratio=0.1")
    assert lr_factor(update, cfg, 104) == pytest.approx(expected)


def test_constant_schedule_after_warmup() -> None:
    cfg = _optim("warmup_steps=2")
    assert [lr_factor(u, cfg, 10) for u in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_the_schedule_sets_the_rate_of_each_update() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = StageOptimizer(
        torch.optim.SGD([p], lr=0.1), _optim("schedule=cosine", "warmup_steps=2", "lr=0.1")
    )
    opt.set_total(10)
    rates = []
    for _ in range(10):
        p.grad = torch.ones(3)
        opt.update()
        rates.append(opt.optimizer.param_groups[0]["lr"])
    expected = [0.1 * lr_factor(u, opt.cfg, 10) for u in range(10)]
    assert rates == pytest.approx(expected)
    # SGD without momentum moved p by the sum of the rates.
    torch.testing.assert_close(p.detach(), -torch.full((3,), sum(expected)))


def test_adamw_decays_the_weights_as_torch_does() -> None:
    """AdamW's decoupled decay: the same update as torch.optim.AdamW on one parameter, and
    not Adam's L2 penalty."""
    torch.manual_seed(0)
    start, grads = torch.randn(4), [torch.randn(4) for _ in range(5)]
    ours, theirs, l2 = (nn.Parameter(start.clone()) for _ in range(3))
    opt = StageOptimizer(
        build_optimizer([ours], _optim("name=adamw", "lr=0.1", "weight_decay=0.5")),
        _optim("name=adamw", "lr=0.1", "weight_decay=0.5"),
    )
    reference = torch.optim.AdamW([theirs], lr=0.1, weight_decay=0.5)
    adam = torch.optim.Adam([l2], lr=0.1, weight_decay=0.5)
    for g in grads:
        ours.grad = g.clone()
        opt.update()
        for p, o in ((theirs, reference), (l2, adam)):
            p.grad = g.clone()
            o.step()
    torch.testing.assert_close(ours.detach(), theirs.detach())
    assert not torch.allclose(ours.detach(), l2.detach())


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_the_fused_update_is_the_default_one_up_to_rounding(name: str) -> None:
    """``optim.fused``: torch's fused kernel, the same update as the default path (to float
    rounding) with the schedule and clipping around it, over several steps."""
    torch.manual_seed(0)
    start, grads = torch.randn(64, 32), [torch.randn(64, 32) for _ in range(6)]
    params, opts = [], []
    for fused in ("false", "true"):
        cfg = _optim(
            f"name={name}", "lr=0.05", "weight_decay=0.1", "clip_norm=1.0", f"fused={fused}"
        )
        p = nn.Parameter(start.clone())
        opts.append(StageOptimizer(build_optimizer([p], cfg), cfg))
        params.append(p)
    assert opts[1].optimizer.defaults["fused"] and not opts[0].optimizer.defaults["fused"]
    for g in grads:
        for p, opt in zip(params, opts, strict=True):
            p.grad = g.clone()
            opt.update()
    assert not torch.equal(params[0].detach(), start)  # it moved
    torch.testing.assert_close(params[1].detach(), params[0].detach(), rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_gradient_norm() -> None:
    p = nn.Parameter(torch.zeros(4))
    opt = StageOptimizer(torch.optim.SGD([p], lr=1.0), _optim("clip_norm=0.5", "lr=1.0"))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    opt.update()
    assert opt.last_grad_norm == pytest.approx(5.0)
    assert float(p.detach().norm()) == pytest.approx(0.5)  # the step had norm 0.5


def test_accumulation_averages_then_steps_once() -> None:
    p = nn.Parameter(torch.zeros(2))
    opt = StageOptimizer(torch.optim.SGD([p], lr=1.0), _optim("accumulate=3", "lr=1.0"))
    total = torch.zeros(2)
    for g in ([1.0, 0.0], [2.0, 3.0]):
        total = total + torch.tensor(g)
        p.grad = total.clone()  # what successive backward passes leave, summed
        assert opt.update() is False
    assert torch.equal(p.detach(), torch.zeros(2))  # nothing yet
    p.grad = total + torch.tensor([3.0, 0.0])
    assert opt.update() is True
    torch.testing.assert_close(p.detach(), -torch.tensor([2.0, 1.0]))  # the mean of three


def test_accumulating_two_half_batches_equals_one_batch(digits: Dataset) -> None:
    """Backprop at batch 32 with accumulate=2 follows batch 64 exactly (no batch norm)."""
    common = ["method.name=backprop", "model.batch_norm=false", "optim.name=sgd", "train.steps=8"]
    half = LocalTrainer(small_config([*common, "data.batch_size=32", "optim.accumulate=2"]), digits)
    # The same 64 samples per update: two consecutive batches of 32 of one epoch are one
    # batch of 64 of the same permutation.
    whole = LocalTrainer(small_config([*common, "data.batch_size=64", "train.steps=4"]), digits)
    half.run()
    whole.run()
    for a, b in zip(
        half.stages[0].module.parameters(), whole.stages[0].module.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_stage_settings_override_the_rest(digits: Dataset) -> None:
    cfg = small_config(
        ["method.name=dni", "stages=3", "optim.lr=0.01", "optim.per_stage=[{stage: 1, lr: 0.5}]"]
    )
    stages = build_stages(cfg, digits.input_shape, 10)
    rates = [s.stage.optimizer.optimizer.param_groups[0]["lr"] for s in stages]
    assert rates == [0.01, 0.5, 0.01]


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("optim.per_stage=[{stage: 5}]", "optim.per_stage[0].stage", "must be below stages"),
        ("optim.per_stage=[{stage: 1}, {stage: 1}]", "optim.per_stage[1].stage", "earlier entry"),
        ("optim.schedule=linear", "optim.schedule", "one of: constant, cosine"),
        ("optim.accumulate=0", "optim.accumulate", "must be >= 1"),
        ("optim.per_stage=[{stage: 0, lr: -1}]", "optim.per_stage[0].lr", "must be > 0"),
    ],
)
def test_bad_settings_are_refused_by_key(override: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({}, ["stages=3", override])
    (problem,) = info.value.problems
    assert problem.startswith(f"{key}: ") and message in problem
