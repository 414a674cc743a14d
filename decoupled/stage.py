"""The stage core every training method shares: stage i's blocks f_i, its optimizer, its figures.

What a stage *does* with a forward or backward message is its method's business
(``decoupled/methods/``); the core offers the pieces they are made of: run f_i on an input that
records its gradient, the loss at the last stage, one optimizer step, inference, and the state a
checkpoint holds. Running figures live in ``StageStats``.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decoupled.optim import StageOptimizer
from decoupled.precision import Precision


class NonFiniteError(RuntimeError):
    """A loss, activation or synthetic gradient became NaN or infinite."""


@dataclass
class StageStats:
    """Running figures of a stage. Totals grow; the window is emptied by ``snapshot()``."""

    steps: int = 0
    samples: int = 0
    compute_s: float = 0.0
    sg_compute_s: float = 0.0
    probe_s: float = 0.0  # the probe's passes (on top of compute_s)
    sg_updates: int = 0
    targets_expired: int = 0
    replay_updates: int = 0  # updates on replayed inputs (dgl's replay), none of new data
    staleness_counts: Counter[int] = field(default_factory=Counter)
    # The latest SG fits, for end-of-run figures that do not depend on when the window was read.
    recent_sg_loss: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    recent_cosine: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    _sg_loss: list[float] = field(default_factory=list)
    _cosine: list[float] = field(default_factory=list)
    _staleness: list[int] = field(default_factory=list)
    # The probe: the synthetic gradient against the exact one (cosine, relative error).
    recent_true_cosine: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    recent_true_error: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    _true_cosine: list[float] = field(default_factory=list)
    _true_error: list[float] = field(default_factory=list)
    _loss: list[float] = field(default_factory=list)
    _correct: int = 0
    _seen: int = 0

    def record_sg_fit(self, loss: float, cosine: float, staleness: int) -> None:
        """One synthesizer update: its loss, prediction/target cosine, and how many steps
        old its target was."""
        self.sg_updates += 1
        self._sg_loss.append(loss)
        self._cosine.append(cosine)
        self.recent_sg_loss.append(loss)
        self.recent_cosine.append(cosine)
        self.record_staleness(staleness)

    def record_staleness(self, staleness: int) -> None:
        """A message from the next stage used ``staleness`` steps after its forward pass."""
        self._staleness.append(staleness)
        self.staleness_counts[staleness] += 1

    def record_probe(self, cosine: float, rel_error: float) -> None:
        """One probe: the synthetic gradient's cosine with the exact one, and its error
        ||δ̂ - g|| / ||g||."""
        self._true_cosine.append(cosine)
        self._true_error.append(rel_error)
        self.recent_true_cosine.append(cosine)
        self.recent_true_error.append(rel_error)

    def run_figures(self) -> dict[str, Any]:
        """End-of-run figures: SG fit over the latest updates, staleness over the whole run."""
        return {
            "sg_loss": _mean(self.recent_sg_loss),
            "sg_cosine": _mean(self.recent_cosine),
            "sg_true_cosine": _mean(self.recent_true_cosine),
            "sg_true_rel_error": _mean(self.recent_true_error),
            "sg_updates": self.sg_updates,
            "sg_compute_s": self.sg_compute_s,
            "probe_s": self.probe_s,
            "targets_expired": self.targets_expired,
            "replay_updates": self.replay_updates or None,
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
            "sg_true_cosine": _mean(self._true_cosine),
            "sg_true_rel_error": _mean(self._true_error),
            "train_loss": _mean(self._loss),
            "train_accuracy": self._correct / self._seen if self._seen else None,
            **staleness_figures(self._staleness),
        }
        self._sg_loss, self._cosine, self._staleness, self._loss = [], [], [], []
        self._true_cosine, self._true_error = [], []
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


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of logits (B, C) against class labels (B,), or of per-token logits
    (B, T, V) against next-token labels (B, T): the mean (or sum) over every prediction."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction=reduction)


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Predictions (one per label: per sample, or per token) whose arg-max is the label."""
    return int((logits.detach().argmax(-1) == labels).sum())


def check_finite(tensor: torch.Tensor, what: str, stage: int, seq: int) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"stage {stage}: non-finite {what} at step {seq}")


class Stage:
    """Stage ``index`` of ``num_stages``: its module, optimizer, device and running figures."""

    def __init__(
        self,
        index: int,
        num_stages: int,
        module: nn.Module,
        optimizer: StageOptimizer,
        device: torch.device | str = "cpu",
        precision: Precision | None = None,
    ) -> None:
        self.index = index
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.optimizer = optimizer
        self.precision = precision if precision is not None else Precision("fp32", self.device)
        self.stats = StageStats()

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-mode f_i on x (B, ...): (the input on this device, recording its gradient
        unless this is the first stage; the output h_i with its graph)."""
        x = x.to(self.device, non_blocking=True)
        if not self.is_first:
            x.requires_grad_(True)
        self.module.train()
        with self.autocast():
            h: torch.Tensor = self.module(x)
        return x, h.float()  # fp32 on the boundary: the next stage and the synthesizer see it

    def autocast(self) -> AbstractContextManager[object]:
        """The context of this stage's forward passes (``train.precision``)."""
        return self.precision.autocast()

    def backward(self, outputs: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Backpropagate a loss, or outputs (B, ...) with their gradient, multiplied by the
        stage's loss scale (fp16; 1 otherwise): the update unscales the parameters'
        gradients, ``input_gradient`` the input's."""
        scaler = self.optimizer.scaler
        if grad is None:
            torch.autograd.backward(scaler.scale(outputs))
        else:
            torch.autograd.backward(outputs, scaler.scale(grad))

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, seq: int
    ) -> tuple[torch.Tensor, int]:
        """Cross-entropy of logits (B, classes) against labels (B,), or (B, T, V) against
        (B, T) (every token counts), and the correct count; both recorded in the figures.
        A non-finite loss stops the run."""
        labels = labels.to(self.device, non_blocking=True)
        loss = cross_entropy(logits, labels)
        check_finite(loss.detach(), "loss", self.index, seq)
        correct = correct_predictions(logits, labels)
        self.stats._loss.append(float(loss.detach()))
        self.stats._correct += correct
        self.stats._seen += labels.numel()
        return loss, correct

    def update(self) -> None:
        """After a backward pass: the optimizer's step (every ``optim.accumulate`` passes, with
        the schedule's learning rate and clipping); the gradients start from zero after it."""
        self.optimizer.update()

    def input_gradient(self, x: torch.Tensor) -> torch.Tensor | None:
        """The gradient the last backward pass left on this stage's input (None at stage 0),
        unscaled: what goes back to the previous stage is never multiplied by this one's
        loss scale."""
        if not x.requires_grad:
            return None
        grad, scaler = x.grad, self.optimizer.scaler
        if grad is None or not scaler.is_enabled():
            return grad
        return grad / scaler.get_scale()

    def count(self, batch: int, start: float, step: bool = True) -> None:
        """Book ``batch`` samples of compute that began at ``start`` (perf_counter); ``step``:
        it completed a training step."""
        self.stats.steps += int(step)
        self.stats.samples += batch
        self.stats.compute_s += time.perf_counter() - start

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Inference with batch-norm running statistics; x: (B, ...) -> this stage's output."""
        self.module.eval()
        with self.autocast():
            out: torch.Tensor = self.module(x.to(self.device, non_blocking=True))
        return out.float()

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
