"""``dgl``: Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon 2019/2020).

Every stage but the last trains on the loss of a small auxiliary classifier of its own, on its
own output: h_i = f_i(x) with x detached, θ_i and the head's weights ← opt(∇ CE(head_i(h_i), y)).
The last stage trains on the model's loss. No gradient crosses a stage boundary, so only
forward messages travel and no stage ever waits for a later one; the bounded forward channels
hold a fast producer back. The head is DGL's auxiliary net: a feature map goes through a 3x3
convolution and an average pool to a small grid, then an MLP (``method.dgl.layers`` of
``hidden`` units) classifies; a sequence's tokens are classified one by one (next-token logits).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from decoupled.config import DGLConfig
from decoupled.methods.base import Method, MethodStage, Sends, StageContext
from decoupled.optim import StageOptimizer, build_optimizer
from decoupled.stage import Stage


def auxiliary_head(shape: tuple[int, ...], num_classes: int, cfg: DGLConfig) -> nn.Module:
    """A classifier of one stage's output (per sample ``shape``): as DGL's auxiliary nets, a
    3x3 convolution and an average pool to a small grid for feature maps, then an MLP. A
    sequence (T, D) gets the MLP on each token's vector: logits (B, T, classes) of the next
    token at every position."""
    layers: list[nn.Module] = []
    if len(shape) == 3:
        channels = shape[0]
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(cfg.pool),
            nn.Flatten(),
        ]
        width = channels * cfg.pool * cfg.pool
    elif len(shape) == 2:
        width = shape[-1]  # nn.Linear maps each token's last dim
    else:
        layers.append(nn.Flatten())
        width = math.prod(shape)
    for _ in range(cfg.layers):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class GreedyStage(MethodStage):
    """A stage that learns from its auxiliary classifier (``head``), or, at the last stage,
    from the model's own loss (``head`` None); its input is never differentiated."""

    def __init__(self, stage: Stage, head: nn.Module | None) -> None:
        super().__init__(stage)
        self.head = head.to(stage.device) if head is not None else None

    @property
    def expects_backward(self) -> bool:
        return False

    def forward(self, seq: int, x: torch.Tensor, labels: torch.Tensor) -> Sends:
        start = time.perf_counter()
        stage = self.stage
        stage.module.train()
        x = x.to(stage.device, non_blocking=True)  # detached: nothing goes back
        with stage.autocast():
            h = stage.module(x)
            logits = h if self.head is None else self.head(h)
        loss, _ = stage.loss(logits.float(), labels, seq)
        stage.backward(loss)
        stage.update()
        stage.count(x.shape[0], start)
        return Sends(forward=None if stage.is_last else h.detach().float())

    def state_dict(self) -> dict[str, Any]:
        state = self.stage.state_dict()
        if self.head is not None:
            state["head"] = self.head.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage.load_state_dict(state)
        if self.head is not None:
            self.head.load_state_dict(state["head"])


class DGL(Method):
    name = "dgl"

    def build_stage(self, stage: Stage, context: StageContext) -> MethodStage:
        if stage.is_last:
            return GreedyStage(stage, None)
        # Seeded apart from the model (its init never shifts), in a fork (the caller's RNG
        # stays as it was).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 2000 + stage.index)
            head = auxiliary_head(context.output_shape, context.num_classes, self.cfg.method.dgl)
        # The head learns with the stage: one optimizer over both.
        params = [*stage.module.parameters(), *head.parameters()]
        optim = self.cfg.optim
        stage.optimizer = StageOptimizer(
            build_optimizer(params, optim, stage.index), optim, stage.optimizer.scaler
        )
        return GreedyStage(stage, head)
