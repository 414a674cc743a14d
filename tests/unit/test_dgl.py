"""``dgl``: greedy local losses, no message backwards."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decoupled.build import build_stages
from decoupled.data import Dataset, TrainStream
from decoupled.local import LocalTrainer
from decoupled.methods.dgl import GreedyStage
from tests.conftest import small_config


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_a_greedy_stage_is_backprop_on_its_blocks_and_head(digits: Dataset, optim: str) -> None:
    """Stage 0 of a DGL run trains exactly as backprop on (its blocks, then its auxiliary
    classifier) would, with the same optimizer over both."""
    cfg = small_config(["method.name=dgl", "stages=2", f"optim.name={optim}", "optim.lr=0.01"])
    first, _ = build_stages(cfg, digits.input_shape, digits.num_classes)
    assert isinstance(first, GreedyStage) and first.head is not None
    reference = nn.Sequential(copy.deepcopy(first.module), copy.deepcopy(first.head))
    opt = (
        torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)
        if optim == "sgd"
        else torch.optim.Adam(reference.parameters(), lr=0.01)
    )
    stream = TrainStream(digits.train_x, digits.train_y, 64, seed=0)
    for step in range(6):
        x, y = stream.batch(step)
        sends = first.forward(step, x, y)
        assert sends.backward is None and sends.forward is not None
        opt.zero_grad()
        torch.autograd.backward(F.cross_entropy(reference(x), y))
        opt.step()
    ours = [*first.module.parameters(), *first.head.parameters()]
    for a, b in zip(ours, reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dgl_learns_with_forward_messages_only(digits: Dataset) -> None:
    cfg = small_config(["method.name=dgl", "stages=3", "train.epochs=6", "model.hidden=64"])
    summary = LocalTrainer(cfg, digits).run()
    assert summary["test_accuracy"] > 0.85
    assert all(s["targets_expired"] == 0 and s["sg_updates"] == 0 for s in summary["stages"])


def test_feature_maps_get_a_pooled_head(digits: Dataset) -> None:
    cfg = small_config(
        ["method.name=dgl", "stages=2", "model.name=cnn", "model.layers=2", "model.hidden=4"]
    )
    first, _ = build_stages(cfg, (3, 16, 16), 10)
    assert isinstance(first, GreedyStage) and first.head is not None
    assert isinstance(first.head, nn.Sequential)
    assert isinstance(first.head[0], nn.Conv2d)
    assert isinstance(first.head[3], nn.AdaptiveAvgPool2d)
    assert first.head(torch.zeros(2, 4, 4, 4)).shape == (2, 10)


def _replay_trainer(digits: Dataset, replay: int) -> LocalTrainer:
    cfg = small_config(["method.name=dgl", "stages=3", f"method.dgl.replay={replay}"])
    return LocalTrainer(cfg, digits)


def _state(trainer: LocalTrainer) -> list[torch.Tensor]:
    return [
        t
        for stage in trainer.stages
        for t in (*stage.module.state_dict().values(), *_head(stage).state_dict().values())
    ]


def _head(stage: object) -> nn.Module:
    assert isinstance(stage, GreedyStage)
    return stage.head if stage.head is not None else nn.Identity()


def test_replay_trains_on_recent_inputs_while_the_producer_is_slow(digits: Dataset) -> None:
    """Stages 1 and 2 find no new input three times after every step: each time they train
    once more on one of their last four inputs (exactly forward's update on it), send nothing,
    and never hold more than four; stage 0 reads the data and keeps none."""
    trainer = _replay_trainer(digits, replay=4)
    stages = trainer.stages
    assert all(isinstance(s, GreedyStage) for s in stages)
    steps, waits = 8, 3
    for step in range(steps):
        x, y = trainer.stream.batch(step)
        trainer.step(step, x, y)
        for index in (1, 2):
            stage = stages[index]
            assert isinstance(stage, GreedyStage)
            # The last min(step + 1, 4) batches' labels, oldest first.
            recent = [trainer.stream.batch(s)[1] for s in range(max(0, step - 3), step + 1)]
            assert all(torch.equal(b[1], r) for b, r in zip(stage.buffer, recent, strict=True))
            for _ in range(waits):
                before = copy.deepcopy(stage)
                assert trainer.idle(index)
                assert len(stage.buffer) <= 4
                # The replayed update is forward's update on one of the buffered inputs.
                after = [
                    p.detach() for p in (*stage.module.parameters(), *_head(stage).parameters())
                ]
                matches = 0
                for bx, by in before.buffer:
                    twin = copy.deepcopy(before)
                    twin.forward(step, bx, by)
                    ps = [
                        p.detach() for p in (*twin.module.parameters(), *_head(twin).parameters())
                    ]
                    matches += all(torch.equal(a, b) for a, b in zip(after, ps, strict=True))
                assert matches >= 1
    first = stages[0]
    assert isinstance(first, GreedyStage) and len(first.buffer) == 0
    with pytest.raises(ValueError, match="never waits"):
        trainer.idle(0)
    for stage in stages[1:]:
        assert stage.stats.replay_updates == steps * waits
        assert stage.stats.steps == steps  # replays are not steps of new data
        assert stage.stats.run_figures()["replay_updates"] == steps * waits


def test_replay_zero_is_dgl_as_before_bit_for_bit(digits: Dataset) -> None:
    """method.dgl.replay=0 (the default): an idle stage does nothing, so idle events between
    the steps leave a run exactly as it is without them, and as the default config."""
    with_waits, without = _replay_trainer(digits, replay=0), _replay_trainer(digits, replay=0)
    default = LocalTrainer(small_config(["method.name=dgl", "stages=3"]), digits)
    assert default.cfg.method.dgl.replay == 0
    for step in range(6):
        x, y = with_waits.stream.batch(step)
        for trainer in (with_waits, without, default):
            trainer.step(step, x, y)
        assert not any(with_waits.idle(i) for i in (1, 2) for _ in range(3))
    for other in (without, default):
        assert all(
            torch.equal(a, b) for a, b in zip(_state(with_waits), _state(other), strict=True)
        )
    for stage in with_waits.stages:
        assert isinstance(stage, GreedyStage) and len(stage.buffer) == 0
        assert (
            stage.stats.replay_updates == 0 and stage.stats.run_figures()["replay_updates"] is None
        )


def test_the_stage_loop_replays_while_its_producer_is_slow(
    digits: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On threads, as on actors: stage 0 reads a slow data source; stage 1 trains on its
    buffer meanwhile instead of waiting, and every step of new data still goes through."""
    from tests.unit.test_runner import run_threads

    batch = TrainStream.batch

    def slow(self: TrainStream, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.01)
        return batch(self, step)

    monkeypatch.setattr(TrainStream, "batch", slow)
    replay = ["method.name=dgl", "stages=2", "method.dgl.replay=8", "train.steps=40"]
    cfg = small_config([*replay, "runtime.backend=ray"])
    runners = run_threads(cfg, digits)
    consumer = runners[1].stage
    assert isinstance(consumer, GreedyStage) and len(consumer.buffer) == 8
    figures = runners[1].final_figures()
    assert figures["steps"] == 40
    assert figures["replay_updates"] > 0
    assert runners[0].final_figures()["replay_updates"] is None
    # channel_depth samples the channel once per message taken (40 steps, a few evaluation
    # batches and the STOP), not at the hundreds of empty looks between replay updates.
    assert 40 <= runners[1].figures.depth_samples <= 50 < figures["replay_updates"]
