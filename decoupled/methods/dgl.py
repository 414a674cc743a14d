"""``dgl``: Decoupled Greedy Learning (Belilovsky, Eickenberg, Oyallon 2019/2020).

Every stage but the last trains on the loss of a small auxiliary classifier of its own, on its
own output: h_i = f_i(x) with x detached, θ_i and the head's weights ← opt(∇ CE(head_i(h_i), y)).
The last stage trains on the model's loss. No gradient crosses a stage boundary, so only
forward messages travel and no stage ever waits for a later one; the bounded forward channels
hold a fast producer back. The head is DGL's auxiliary net: a feature map goes through a 3x3
convolution and an average pool to a small grid, then an MLP (``method.dgl.layers`` of
``hidden`` units) classifies; a sequence's tokens are classified one by one (next-token logits).

Asynchronous DGL (the 2020 paper's replay buffer, ``method.dgl.replay`` > 0): a stage after the
first keeps its last ``replay`` inputs with their labels, and whenever its producer is slower and
no new input is ready it trains once more on one of them, drawn at random, instead of waiting;
nothing of a replay is sent on. Replayed passes count as updates for ``optim.accumulate`` and the
learning-rate schedule; the buffer is not part of a checkpoint (it refills within ``replay``
steps). A replaying stage never waits, so where stages share CPU cores it takes time from its
producer: replay is for stages on devices of their own.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import torch
from torch import nn

from decoupled.config import DGLConfig
from decoupled.methods.base import Method, MethodStage, Sends, StageContext
from decoupled.optim import StageOptimizer, build_optimizer
from decoupled.stage import Stage, check_finite, cross_entropy


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

    def __init__(
        self, stage: Stage, head: nn.Module | None, replay: int = 0, seed: int = 0
    ) -> None:
        super().__init__(stage)
        self.head = head.to(stage.device) if head is not None else None
        # Recent inputs (x (B, ...) on this device, labels (B,)) to train on while none is new.
        # Stage 0 reads the data and never waits: it keeps none.
        size = 0 if stage.is_first else replay
        self.buffer: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=size)
        self._draws = torch.Generator().manual_seed(seed)

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
        if self.buffer.maxlen:
            self.buffer.append((x, labels))
        return Sends(forward=None if stage.is_last else h.detach().float())

    def idle(self) -> bool:
        """No new input yet: one more update on a recent input drawn at random (the same
        loss as ``forward``; not in the training figures, which describe new data)."""
        if not self.buffer:
            return False
        start = time.perf_counter()
        stage = self.stage
        x, labels = self.buffer[int(torch.randint(len(self.buffer), (1,), generator=self._draws))]
        stage.module.train()
        with stage.autocast():
            h = stage.module(x)
            logits = h if self.head is None else self.head(h)
        loss = cross_entropy(logits.float(), labels.to(stage.device, non_blocking=True))
        check_finite(loss.detach(), "replay loss", stage.index, -1)
        stage.backward(loss)
        stage.update()
        stage.stats.replay_updates += 1
        stage.stats.compute_s += time.perf_counter() - start
        return True

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
        replay, seed = self.cfg.method.dgl.replay, self.cfg.seed + 3000 + stage.index
        if stage.is_last:
            return GreedyStage(stage, None, replay, seed)
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
        return GreedyStage(stage, head, replay, seed)
