"""``delayed``: an asynchronous pipeline of true gradients, applied late, without a flush.

PipeDream's weight stashing (Narayanan et al. 2019; DDG, Huo et al. 2018): stage i runs the
forward pass of step t with its current weights W_i(t), keeps its input and a copy of those
weights and buffers (the stash), and sends h_i on; the last stage computes the loss, updates at
once and sends the true ∂L/∂h back. When that gradient reaches stage i, maybe several steps
later, the stashed pass is recomputed on the stashed copy (so the gradient is the one of the
weights that produced step t's activations), the parameter gradient is applied to the current
weights and ∂L/∂x goes back in turn. Staleness (steps between a forward pass and its update) is
recorded as for synthetic-gradient targets; stashes are bounded by ``method.sg.history`` and a
gradient that comes back after its stash was dropped is counted in ``targets_expired``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
from torch.func import functional_call

from decoupled.methods.backprop import LossStage
from decoupled.methods.base import Method, MethodStage, Sends, StageContext
from decoupled.stage import Stage


class Stash(NamedTuple):
    x: torch.Tensor  # (B, ...) the input of the forward pass
    params: dict[str, torch.Tensor]  # the weights it ran with
    buffers: dict[str, torch.Tensor]  # and the buffers (batch-norm statistics) before it


class StashingStage(MethodStage):
    def __init__(self, stage: Stage, history: int) -> None:
        super().__init__(stage)
        self.capacity = history
        self.stashes: OrderedDict[int, Stash] = OrderedDict()
        self._last_seq = -1

    def forward(self, seq: int, x: torch.Tensor, labels: torch.Tensor) -> Sends:
        start = time.perf_counter()
        stage, module = self.stage, self.stage.module
        self._last_seq = seq
        x = x.to(stage.device, non_blocking=True)
        self.stashes[seq] = Stash(
            x,
            {name: p.detach().clone() for name, p in module.named_parameters()},
            {name: b.detach().clone() for name, b in module.named_buffers()},
        )
        while len(self.stashes) > self.capacity:
            self.stashes.popitem(last=False)
        module.train()
        with torch.no_grad():
            h = module(x)
        stage.count(x.shape[0], start)
        return Sends(forward=h)

    def backward(self, seq: int, grad: torch.Tensor) -> Sends:
        """The true ∂L/∂h_i (B, ...) of step ``seq``: the parameter gradient against the
        weights stashed for that step, applied now."""
        stash = self.stashes.pop(seq, None)
        stage = self.stage
        if stash is None:
            stage.stats.targets_expired += 1
            return Sends()
        start = time.perf_counter()
        params = {name: p.requires_grad_(True) for name, p in stash.params.items()}
        x = stash.x.requires_grad_(not self.is_first)
        # The stashed buffers are a copy, so the recomputation leaves the live statistics be.
        h = functional_call(stage.module, {**params, **stash.buffers}, (x,))
        torch.autograd.backward(h, grad.to(stage.device, non_blocking=True))
        for name, p in stage.module.named_parameters():
            p.grad = params[name].grad
        stage.update()
        stage.stats.record_staleness(self._last_seq - seq)
        stage.stats.compute_s += time.perf_counter() - start
        return Sends(backward=x.grad if x.requires_grad else None)

    def held(self) -> int:
        return len(self.stashes)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stashes.clear()


class Delayed(Method):
    name = "delayed"

    def build_stage(self, stage: Stage, context: StageContext) -> MethodStage:
        if stage.is_last:
            return LossStage(stage)
        return StashingStage(stage, self.cfg.method.sg.history)
