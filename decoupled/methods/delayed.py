"""``delayed``: an asynchronous pipeline of true gradients, applied late, without a flush.

PipeDream's weight stashing (Narayanan et al. 2019; DDG, Huo et al. 2018): stage i runs the
forward pass of step t on a copy of its current weights W_i(t) and keeps that pass's graph (the
stash: no recomputation, one weight copy per step in flight; the optimizer changes the live
weights in place, never the copy), and sends h_i on; the last stage computes the loss, updates
at once and sends the true ∂L/∂h back. When that gradient reaches stage i, maybe several steps
later, it is backpropagated through the stashed graph (the gradient of the weights that produced
step t's activations), applied to the current weights, and ∂L/∂x goes back in turn.
Staleness (steps between a forward pass and its update) is recorded as for synthetic-gradient
targets; stashes are bounded by ``method.sg.history``, and a gradient that comes back after its
stash was dropped is counted in ``targets_expired``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
from torch.func import functional_call

from decoupled.methods.backprop import LossStage
from decoupled.methods.base import Method, MethodStage, Sends, StageContext
from decoupled.stage import Stage, check_finite


class Stash(NamedTuple):
    x: torch.Tensor  # (B, ...) the input of the forward pass (recording its gradient past stage 0)
    h: torch.Tensor  # (B, ...) its output, with the graph back to ``params``
    params: dict[str, torch.Tensor]  # the weights it ran with: a copy no update touches


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
        x = x.to(stage.device, non_blocking=True).requires_grad_(not self.is_first)
        params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
        # Buffers run as copies too: the graph keeps the batch-norm statistics it saw, and the
        # module's own are updated from the copies, as a plain forward pass would update them.
        buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
        module.train()
        with stage.autocast():
            h = functional_call(module, {**params, **buffers}, (x,)).float()
        check_finite(h.detach(), "activation", stage.index, seq)
        with torch.no_grad():
            for name, live in module.named_buffers():
                live.copy_(buffers[name])
        self.stashes[seq] = Stash(x, h, params)
        while len(self.stashes) > self.capacity:
            self.stashes.popitem(last=False)
        stage.count(x.shape[0], start)
        return Sends(forward=h.detach())

    def backward(self, seq: int, grad: torch.Tensor) -> Sends:
        """The true ∂L/∂h_i (B, ...) of step ``seq``: backpropagated through the graph of the
        stashed weights, and the parameter gradient applied to the current ones."""
        stash = self.stashes.pop(seq, None)
        stage = self.stage
        if stash is None:
            stage.stats.targets_expired += 1
            return Sends()
        start = time.perf_counter()
        stage.backward(stash.h, grad.to(stage.device, non_blocking=True))
        for name, p in stage.module.named_parameters():
            p.grad = stash.params[name].grad
        stage.update()
        stage.stats.record_staleness(self._last_seq - seq)
        stage.stats.compute_s += time.perf_counter() - start
        return Sends(backward=stage.input_gradient(stash.x))

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
