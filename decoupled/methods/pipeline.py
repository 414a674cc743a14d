"""``pipeline``: model parallelism with true gradients, GPipe-style (one flush per batch).

Stage 0 cuts each batch into ``method.micro_batches``; every stage runs each micro-batch forward
as it arrives and keeps its graph; the last stage backpropagates each micro-batch's loss (scaled
by 1/m, so the accumulated gradient is the batch mean) at once and sends its input gradient back;
every other stage backpropagates a held graph when its gradient arrives. One optimizer step per
batch, once all m gradients are in: the same update as backprop (batch-norm aside, which sees
smaller batches).
"""

from __future__ import annotations

import time

import torch

from decoupled.methods.base import Method, MethodStage, Sends, StageContext
from decoupled.stage import Stage


class PipelineStage(MethodStage):
    def __init__(self, stage: Stage, micro_batches: int) -> None:
        super().__init__(stage)
        self.micro_batches = micro_batches
        # (input, output) of micro-batches whose gradient is still to come
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, seq: int, x: torch.Tensor, labels: torch.Tensor) -> Sends:
        start = time.perf_counter()
        stage = self.stage
        x, h = stage.forward(x)
        if not stage.is_last:
            self._held[seq] = (x, h)
            stage.count(x.shape[0], start, step=False)
            return Sends(forward=h.detach())
        loss, _ = stage.loss(h, labels, seq)
        stage.backward(loss / self.micro_batches)
        stage.count(x.shape[0], start, step=False)
        return Sends(backward=stage.input_gradient(x))

    def backward(self, seq: int, grad: torch.Tensor) -> Sends:
        start = time.perf_counter()
        x, h = self._held.pop(seq)
        self.stage.backward(h, grad.to(self.stage.device, non_blocking=True))
        self.stage.stats.compute_s += time.perf_counter() - start
        return Sends(backward=self.stage.input_gradient(x))

    def backward_due(self) -> int:
        return len(self._held)

    def end_step(self) -> None:
        start = time.perf_counter()
        self.stage.update()
        self.stage.count(0, start)

    def held(self) -> int:
        return len(self._held)


class Pipeline(Method):
    name = "pipeline"

    def micro_batches(self) -> int:
        return self.cfg.method.micro_batches

    def build_stage(self, stage: Stage, context: StageContext) -> MethodStage:
        return PipelineStage(stage, self.micro_batches())
