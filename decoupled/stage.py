"""One stage's step logic: what a stage actor runs unchanged and the local trainer runs in turn.

Stage i of K holds f_i (its blocks), the optimizer of θ_i and, unless it is the last stage, the
synthesizer M_{i+1} with its own optimizer and a bounded history of its outputs.

``train_step(seq, x, y)``, update-unlocked (DNI/cDNI):
  h_i = f_i(x);  δ̂_i = scale · M_{i+1}(h_i [, y]);  θ_i ← opt(θ_i, (∂h_i/∂θ_i)ᵀ δ̂_i)
  and, from the same backward pass, the target for the previous stage's synthesizer
  g_{i-1} = (∂h_i/∂x)ᵀ δ̂_i (bootstrapped). The last stage uses the true loss instead of δ̂, so its
  g_{K-2} is the true gradient. A single stage (K = 1) is plain backprop.
``train_synthesizer(seq, g_i)``: when g_i arrives, possibly late, fit M_{i+1}(h_i) to it with the
  h_i kept for that ``seq``.
``forward_hold`` / ``backward_held`` / ``apply_update``: the locked baseline (``pipeline``): true
  gradients through micro-batches, one optimizer step per batch.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decoupled.history import ActivationHistory
from decoupled.synthesizer import Synthesizer


class NonFiniteError(RuntimeError):
    """A loss, activation or synthetic gradient became NaN or infinite."""


@dataclass
class StepResult:
    activations: torch.Tensor | None  # (B, ...) h_i detached; None at the last stage
    target: torch.Tensor | None  # (B, ...) g_{i-1} for the previous stage; None at the first
    loss: float | None = None  # last stage only
    correct: int | None = None  # last stage only: correct predictions in the batch


@dataclass
class StageStats:
    """Running figures of a stage. Totals grow; the window is emptied by ``snapshot()``."""

    steps: int = 0
    samples: int = 0
    compute_s: float = 0.0
    sg_compute_s: float = 0.0
    sg_updates: int = 0
    targets_expired: int = 0
    staleness_counts: Counter[int] = field(default_factory=Counter)
    # The latest SG fits, for end-of-run figures that do not depend on when the window was read.
    recent_sg_loss: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    recent_cosine: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    _sg_loss: list[float] = field(default_factory=list)
    _cosine: list[float] = field(default_factory=list)
    _staleness: list[int] = field(default_factory=list)
    _loss: list[float] = field(default_factory=list)
    _correct: int = 0
    _seen: int = 0

    def run_figures(self) -> dict[str, Any]:
        """End-of-run figures: SG fit over the latest updates, staleness over the whole run."""
        return {
            "sg_loss": _mean(self.recent_sg_loss),
            "sg_cosine": _mean(self.recent_cosine),
            "sg_updates": self.sg_updates,
            "sg_compute_s": self.sg_compute_s,
            "targets_expired": self.targets_expired,
            **staleness_figures(self.staleness_counts),
        }

    def snapshot(self) -> dict[str, Any]:
        """Totals and the window's means since the previous snapshot (None where it is empty)."""
        out: dict[str, Any] = {
            "steps": self.steps,
            "samples": self.samples,
            "compute_s": self.compute_s,
            "sg_compute_s": self.sg_compute_s,
            "sg_updates": self.sg_updates,
            "targets_expired": self.targets_expired,
            "sg_loss": _mean(self._sg_loss),
            "sg_cosine": _mean(self._cosine),
            "train_loss": _mean(self._loss),
            "train_accuracy": self._correct / self._seen if self._seen else None,
            **staleness_figures(self._staleness),
        }
        self._sg_loss, self._cosine, self._staleness, self._loss = [], [], [], []
        self._correct = self._seen = 0
        return out


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def staleness_figures(values: list[int] | Counter[int]) -> dict[str, float | None]:
    """Mean, median, 90th percentile and maximum of target staleness (in steps)."""
    counts = values if isinstance(values, Counter) else Counter(values)
    total = sum(counts.values())
    if not total:
        return {
            "staleness_mean": None,
            "staleness_p50": None,
            "staleness_p90": None,
            "staleness_max": None,
        }
    ordered = sorted(counts.items())

    def quantile(q: float) -> float:
        rank, seen = q * (total - 1), 0
        for value, n in ordered:
            seen += n
            if seen > rank:
                return float(value)
        return float(ordered[-1][0])

    return {
        "staleness_mean": sum(v * n for v, n in ordered) / total,
        "staleness_p50": quantile(0.5),
        "staleness_p90": quantile(0.9),
        "staleness_max": float(ordered[-1][0]),
    }


def _check_finite(tensor: torch.Tensor, what: str, stage: int, seq: int) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"stage {stage}: non-finite {what} at step {seq}")


class Stage:
    """One stage of a K-stage network and everything it updates locally."""

    def __init__(
        self,
        index: int,
        num_stages: int,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        synthesizer: Synthesizer | None = None,
        sg_optimizer: torch.optim.Optimizer | None = None,
        sg_scale: float = 1.0,
        history: int = 64,
        device: torch.device | str = "cpu",
    ) -> None:
        self.index = index
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.optimizer = optimizer
        self.synthesizer = synthesizer.to(self.device) if synthesizer is not None else None
        self.sg_optimizer = sg_optimizer
        self.sg_scale = sg_scale
        self.history = ActivationHistory(history)
        self.stats = StageStats()
        # pipeline: (input, output) of micro-batches whose backward is still to come
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last_seq = -1

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if not self.is_first:
            x.requires_grad_(True)
        return x

    def _loss(
        self, logits: torch.Tensor, labels: torch.Tensor, seq: int
    ) -> tuple[torch.Tensor, int]:
        loss = F.cross_entropy(logits, labels)
        _check_finite(loss.detach(), "loss", self.index, seq)
        correct = int((logits.detach().argmax(1) == labels).sum())
        return loss, correct

    def _record_loss(self, loss: float, correct: int, batch: int) -> None:
        self.stats._loss.append(loss)
        self.stats._correct += correct
        self.stats._seen += batch

    def train_step(self, seq: int, x: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """Forward, update θ_i at once, and compute the target for the previous stage.

        x: (B, ...) input of this stage (h_{i-1}, or the data at stage 0); labels: (B,) int64.
        """
        start = time.perf_counter()
        self._last_seq = seq
        self.module.train()
        labels = labels.to(self.device, non_blocking=True)
        x = self._input(x)
        h = self.module(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss_value: float | None = None
        correct: int | None = None
        if self.is_last:
            loss, correct = self._loss(h, labels, seq)
            torch.autograd.backward(loss)
            loss_value = float(loss.detach())
        else:
            if self.synthesizer is None:
                raise RuntimeError(f"stage {self.index} is not the last and has no synthesizer")
            _check_finite(h.detach(), "activation", self.index, seq)
            with torch.no_grad():
                grad = self.sg_scale * self.synthesizer(h.detach(), labels)
            _check_finite(grad, "synthetic gradient", self.index, seq)
            torch.autograd.backward(h, grad)
            self.history.put(seq, h.detach(), labels)
        self.optimizer.step()
        target = x.grad if not self.is_first else None
        self._count_step(x.shape[0], start)
        if loss_value is not None and correct is not None:
            self._record_loss(loss_value, correct, x.shape[0])
        return StepResult(None if self.is_last else h.detach(), target, loss_value, correct)

    def train_synthesizer(self, seq: int, target: torch.Tensor) -> None:
        """Fit M_{i+1}(h_i [, y]) to the target g_i that came back for step ``seq``.

        target: (B, ...) shaped like this stage's output h_i.
        """
        if self.synthesizer is None or self.sg_optimizer is None:
            raise RuntimeError(f"stage {self.index} has no synthesizer to train")
        entry = self.history.pop(seq)
        if entry is None:
            self.stats.targets_expired += 1
            return
        start = time.perf_counter()
        target = target.to(self.device, non_blocking=True)
        prediction = self.synthesizer(entry.activations, entry.labels)
        loss = F.mse_loss(prediction, target)
        sg_loss = float(loss.detach())
        if not math.isfinite(sg_loss):
            # An inf/NaN target (an overflowed true gradient, say) would poison M in one step.
            raise NonFiniteError(f"stage {self.index}: non-finite SG loss at step {seq}")
        self.sg_optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        self.sg_optimizer.step()
        stats = self.stats
        stats.sg_updates += 1
        cosine = float(F.cosine_similarity(prediction.detach().flatten(), target.flatten(), dim=0))
        stats._sg_loss.append(sg_loss)
        stats._cosine.append(cosine)
        stats.recent_sg_loss.append(sg_loss)
        stats.recent_cosine.append(cosine)
        staleness = self._last_seq - seq  # steps this stage took since it used h_i for seq
        stats._staleness.append(staleness)
        stats.staleness_counts[staleness] += 1
        elapsed = time.perf_counter() - start
        stats.sg_compute_s += elapsed
        stats.compute_s += elapsed

    def forward_hold(
        self, seq: int, x: torch.Tensor, labels: torch.Tensor, micro_batches: int
    ) -> StepResult:
        """Pipeline forward of one micro-batch, keeping the graph for ``backward_held``.

        At the last stage the loss (scaled by 1/micro_batches, so the accumulated gradient is the
        batch mean) is backpropagated at once, and its input gradient is the returned target.
        """
        start = time.perf_counter()
        self.module.train()
        labels = labels.to(self.device, non_blocking=True)
        x = self._input(x)
        h = self.module(x)
        if not self.is_last:
            self._held[seq] = (x, h)
            self._count_step(x.shape[0], start)
            return StepResult(h.detach(), None)
        loss, correct = self._loss(h, labels, seq)
        torch.autograd.backward(loss / micro_batches)
        self._count_step(x.shape[0], start)
        self._record_loss(float(loss.detach()), correct, x.shape[0])
        target = x.grad if not self.is_first else None
        return StepResult(None, target, float(loss.detach()), correct)

    def backward_held(self, seq: int, grad: torch.Tensor) -> torch.Tensor | None:
        """Backpropagate the true gradient of this stage's output for micro-batch ``seq``;
        returns the gradient for the previous stage (None at the first)."""
        start = time.perf_counter()
        x, h = self._held.pop(seq)
        torch.autograd.backward(h, grad.to(self.device, non_blocking=True))
        self.stats.compute_s += time.perf_counter() - start
        return x.grad if not self.is_first else None

    def apply_update(self) -> None:
        """One optimizer step from the gradients accumulated over a batch's micro-batches."""
        start = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.compute_s += time.perf_counter() - start

    def _count_step(self, batch: int, start: float) -> None:
        self.stats.steps += 1
        self.stats.samples += batch
        self.stats.compute_s += time.perf_counter() - start

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with batch-norm running statistics; x: (B, ...) -> this stage's output."""
        self.module.eval()
        out: torch.Tensor = self.module(x.to(self.device, non_blocking=True))
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.synthesizer is not None and self.sg_optimizer is not None:
            state["synthesizer"] = self.synthesizer.state_dict()
            state["sg_optimizer"] = self.sg_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.synthesizer is not None and self.sg_optimizer is not None:
            self.synthesizer.load_state_dict(state["synthesizer"])
            self.sg_optimizer.load_state_dict(state["sg_optimizer"])
        self.history.clear()
