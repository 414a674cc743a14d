"""``dgl``: greedy local losses, no message backwards."""

from __future__ import annotations

import copy

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
