"""``delayed``: true gradients applied late against stashed weights (PipeDream)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from decoupled.data import Dataset
from decoupled.local import LocalTrainer
from decoupled.methods.delayed import StashingStage
from tests.conftest import small_config, with_history


def _params(trainer: LocalTrainer) -> list[torch.Tensor]:
    return [p.detach() for s in trainer.stages for p in s.module.parameters()]


@pytest.mark.parametrize("optim", ["sgd", "adam"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_zero_delay_equals_backprop(digits: Dataset, optim: str, batch_norm: bool) -> None:
    common = [
        f"optim.name={optim}",
        "optim.lr=0.01",
        "train.steps=8",
        f"model.batch_norm={str(batch_norm).lower()}",
    ]
    delayed = LocalTrainer(small_config(["method.name=delayed", "stages=3", *common]), digits)
    backprop = LocalTrainer(small_config(["method.name=backprop", *common]), digits)
    delayed.run()
    backprop.run()
    for a, b in zip(_params(delayed), _params(backprop), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(  # batch-norm statistics too: the recomputation leaves them be
        [b for s in delayed.stages for b in s.module.buffers()],
        [b for s in backprop.stages for b in s.module.buffers()],
        strict=True,
    ):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)


def test_with_delay_d_the_update_at_step_t_uses_the_weights_of_step_t_minus_d(
    digits: Dataset,
) -> None:
    delay = 2
    cfg = small_config(
        ["method.name=delayed", "stages=2", f"method.delay={delay}", "train.steps=10"]
    )
    trainer = LocalTrainer(cfg, digits)
    first = trainer.stages[0]
    assert isinstance(first, StashingStage)
    weights: dict[int, list[torch.Tensor]] = {}  # step -> stage 0's weights at its forward pass
    used: list[tuple[int, int]] = []  # (step whose gradient was applied, step it was applied in)
    step_now = [0]
    forward, backward = first.forward, first.backward

    def recording_forward(seq: int, x: torch.Tensor, labels: torch.Tensor) -> Any:
        step_now[0] = seq
        weights[seq] = [p.detach().clone() for p in first.module.parameters()]
        return forward(seq, x, labels)

    def checking_backward(seq: int, grad: torch.Tensor) -> Any:
        stash = first.stashes[seq]
        for stashed, then in zip(stash.params.values(), weights[seq], strict=True):  # unchanged
            assert torch.equal(stashed, then)  # the weights of that step's forward pass
        used.append((seq, step_now[0]))
        return backward(seq, grad)

    first.forward = recording_forward  # type: ignore[method-assign]
    first.backward = checking_backward  # type: ignore[method-assign]
    summary = trainer.run()
    assert used == [(t, t + delay) for t in range(10 - delay)]
    assert summary["stages"][0]["staleness_mean"] == delay
    # The first update came at the end of step d: steps 0..d ran on the initial weights.
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[delay], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[delay + 1], strict=True))


def test_delayed_learns_and_bounds_its_stashes(digits: Dataset) -> None:
    # A history of 2 is refused in process with this delay (config check); on actors a late
    # gradient can still outlive its stash, which is what this counts.
    bounded = small_config(["method.name=delayed", "stages=3", "method.delay=3", "train.epochs=3"])
    summary = LocalTrainer(with_history(bounded, 2), digits).run()
    # Gradients came back after their stash was dropped: counted, not applied.
    assert summary["stages"][1]["targets_expired"] > 0
    cfg = small_config(["method.name=delayed", "stages=3", "method.delay=1", "train.epochs=6"])
    assert LocalTrainer(cfg, digits).run()["test_accuracy"] > 0.9
