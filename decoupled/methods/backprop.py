"""``backprop``: the reference. Forward, loss, backward, one optimizer step.

Its stage is also the last stage of every method that trains on the true loss there (DNI,
cDNI): the input gradient it sends back is the true ∂L/∂h_{K-2}.
"""

from __future__ import annotations

import time

import torch

from decoupled.methods.base import Method, MethodStage, Sends, StageContext
from decoupled.stage import Stage


class LossStage(MethodStage):
    """Updates from the true loss at once; sends back the gradient of its input."""

    def forward(self, seq: int, x: torch.Tensor, labels: torch.Tensor) -> Sends:
        start = time.perf_counter()
        stage = self.stage
        x, logits = stage.forward(x)
        loss, _ = stage.loss(logits, labels, seq)
        stage.backward(loss)
        stage.update()
        stage.count(x.shape[0], start)
        return Sends(backward=stage.input_gradient(x))


class Backprop(Method):
    name = "backprop"

    def num_stages(self) -> int:
        return 1  # the whole model in one place, whatever ``stages`` says

    def build_stage(self, stage: Stage, context: StageContext) -> MethodStage:
        return LossStage(stage)
