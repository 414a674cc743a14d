"""The method interface: what one stage of a training method holds and does on each event.

A method (``Method``) is chosen by ``method.name``; it says how many stages run and into how many
micro-batches stage 0 cuts a batch, and builds each stage's part (``MethodStage``): the stage core
plus whatever the method adds beside it (a synthesizer, held graphs, stashed weights...).

A ``MethodStage`` answers three events, and each answer says what to send on (``Sends``):
- ``forward(seq, x, labels)``: a training micro-batch arrived (at stage 0: from the data);
- ``backward(seq, grad)``: a message came back from the next stage for micro-batch ``seq``;
- ``end_step()``: every micro-batch of the step has been forwarded and ``backward_due()`` is 0;
- ``idle()``: between steps, no input is ready for this stage (its producer is slower); it may
  do work of its own meanwhile (dgl's replay) and says whether it did.

The loops that drive these events (``runner.StageRunner`` on an actor, ``local.LocalTrainer`` in
one process) know nothing of any method: adding one is a module in this package and a name in
``decoupled.methods.METHODS``.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from decoupled.config import Config
from decoupled.stage import Stage, StageStats, cross_entropy


@dataclass
class Sends:
    """What a stage sends on after an event (None: nothing that way)."""

    forward: torch.Tensor | None = None  # (B, ...) h_i for the next stage, detached
    backward: torch.Tensor | None = None  # (B, ...) for the previous stage, shaped like its h


@dataclass(frozen=True)
class StageContext:
    """What a method needs to know about the stage it builds its part for."""

    output_shape: tuple[int, ...]  # one sample's h_i, without the batch dimension
    num_classes: int
    seed: int


class MethodStage(ABC):
    """One stage's part of a method, built around the shared ``Stage`` core."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        # The probe in flight: (seq, input, output with its graph, predicted gradient).
        self._probe: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        # The exact ∂L/∂h_i of the latest probe batch (non-last stages).
        self.probe_gradient: torch.Tensor | None = None

    # -- what the loops read ---------------------------------------------------------------
    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def is_first(self) -> bool:
        return self.stage.is_first

    @property
    def is_last(self) -> bool:
        return self.stage.is_last

    @property
    def device(self) -> torch.device:
        return self.stage.device

    @property
    def module(self) -> torch.nn.Module:
        return self.stage.module

    @property
    def stats(self) -> StageStats:
        return self.stage.stats

    @property
    def expects_backward(self) -> bool:
        """Whether a message comes back from the next stage for each micro-batch sent on."""
        return not self.is_last

    def backward_due(self) -> int:
        """Backward messages this step cannot end without (0: the method does not wait)."""
        return 0

    # -- the events --------------------------------------------------------------------------
    @abstractmethod
    def forward(self, seq: int, x: torch.Tensor, labels: torch.Tensor) -> Sends:
        """Training micro-batch ``seq``: x (B, ...) this stage's input, labels (B,) int64
        (text: (B, T), the next token at every position)."""

    def backward(self, seq: int, grad: torch.Tensor) -> Sends:
        """A message from the next stage for micro-batch ``seq``, shaped like this stage's h."""
        raise RuntimeError(f"stage {self.index} of {type(self).__name__} takes no backward message")

    def end_step(self) -> None:  # noqa: B027 (most methods do nothing here)
        """The step's micro-batches are all through (and its due backward messages)."""

    def idle(self) -> bool:
        """No input is ready for this stage, between two steps: True when it did work of its
        own meanwhile (the loop then looks for input again at once), False when it has none
        (the loop waits for input). Never called inside a step, nor at stage 0 of a chain."""
        return False

    def agree(self, flag: bool) -> bool:
        """``flag`` as every stage that reads the data sees it (replicas agree on a checkpoint
        request through their process group); called once per step by every such stage."""
        return flag

    # -- the probe: exact gradients at the boundaries, no update ---------------------------------
    def probe_forward(self, seq: int, x: torch.Tensor, labels: torch.Tensor) -> Sends:
        """Probe batch ``seq``: this stage's output, on the last stage the exact gradient of
        its input. The pass runs on a copy of the stage's blocks, whose graph stays valid
        however many updates the stage makes before the gradient comes back, and whose
        batch-norm statistics are the copy's to change."""
        start = time.perf_counter()
        try:
            stage = self.stage
            module = copy.deepcopy(stage.module).train()
            x = x.to(stage.device, non_blocking=True).requires_grad_(not self.is_first)
            labels = labels.to(stage.device, non_blocking=True)
            h = module(x)
            if self.is_last:
                loss = cross_entropy(h, labels)
                grad = torch.autograd.grad(loss, x)[0] if x.requires_grad else None
                return Sends(backward=grad)
            self._probe = (seq, x, h, self.predicted_gradient(h.detach(), labels))
            return Sends(forward=h.detach())
        finally:
            self.stats.probe_s += time.perf_counter() - start

    def probe_backward(self, seq: int, grad: torch.Tensor) -> Sends:
        """The exact ∂L/∂h_i (B, ...) of probe batch ``seq``: compared with the gradient the
        method would have used at the time, then passed on through the copy's graph."""
        if self._probe is None or self._probe[0] != seq:
            return Sends()  # a probe this stage no longer holds (a restart in between)
        start = time.perf_counter()
        _, x, h, predicted = self._probe
        self._probe = None
        grad = grad.to(self.device, non_blocking=True)
        self.probe_gradient = grad
        if predicted is not None:
            cosine = F.cosine_similarity(predicted.flatten(), grad.flatten(), dim=0)
            error = (predicted - grad).norm() / grad.norm().clamp_min(1e-12)
            self.stats.record_probe(float(cosine), float(error))
        sends = Sends(backward=torch.autograd.grad(h, x, grad)[0]) if x.requires_grad else Sends()
        self.stats.probe_s += time.perf_counter() - start
        return sends

    @property
    def probe_pending(self) -> bool:
        """A probe went on and its exact gradient has not come back yet."""
        return self._probe is not None

    def predicted_gradient(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The gradient of h (B, ...) this stage would update with now (methods with synthetic
        gradients), for the probe to compare with the exact one; None: nothing to compare."""
        return None

    # -- inference, figures, state -------------------------------------------------------------
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage.evaluate(x)

    def held(self) -> int:
        """Activations or graphs kept for messages still to come (a bounded figure)."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        return self.stage.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage.load_state_dict(state)


class Method(ABC):
    """A training method as configured: the stage count, micro-batching, and per-stage parts."""

    name: ClassVar[str]
    # Whether stages update from synthetic gradients (the probe compares them with exact ones).
    synthetic_gradients: ClassVar[bool] = False
    # False: a chain of K stages, each holding a slice of the model, messages between
    # neighbours. True: K replicas of the whole model, each reading the data (``ddp``).
    replicas: ClassVar[bool] = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def num_stages(self) -> int:
        return self.cfg.stages

    def probe_every(self) -> int:
        """Steps between synthetic-gradient probes (0: none; methods without synthetic
        gradients have nothing to compare)."""
        return self.cfg.method.sg.probe_every if self.synthetic_gradients else 0

    def micro_batches(self) -> int:
        """Micro-batches stage 0 cuts each batch into (every one a ``forward`` event)."""
        return 1

    @abstractmethod
    def build_stage(self, stage: Stage, context: StageContext) -> MethodStage:
        """This method's part of ``stage``."""

    def boundary_work(
        self, shape: tuple[int, ...], num_classes: int
    ) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
        """One step's worth of the work this method adds at a stage boundary whose activation
        has ``shape`` (per sample), as a function of (h (B, *shape), labels (B,)); None: none.
        ``model.boundaries=auto`` times it to balance the stages."""
        return None
