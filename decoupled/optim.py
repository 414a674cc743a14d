"""A stage's optimizer as the config asks for it: the algorithm, per-stage overrides, the
learning-rate schedule, gradient clipping and accumulation.

Every method updates its stage through ``StageOptimizer.update()`` after a backward pass; it
steps the wrapped torch optimizer once every ``optim.accumulate`` calls (the gradients summed in
between are averaged), clips the stage's gradient norm to ``optim.clip_norm`` and sets the
learning rate of the schedule for that update. In a decoupled run each stage clips its own
gradient: there is no global norm without the synchronisation the method avoids (with one stage
it is the global norm).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from decoupled.config import OptimConfig


def stage_settings(cfg: OptimConfig, index: int) -> tuple[float, float]:
    """(lr, weight_decay) of stage ``index``: ``optim.per_stage`` entries override the rest."""
    lr, decay = cfg.lr, cfg.weight_decay
    for override in cfg.per_stage:
        if override.stage == index:
            lr = override.lr if override.lr is not None else lr
            decay = override.weight_decay if override.weight_decay is not None else decay
    return lr, decay


def build_optimizer(
    params: Iterable[nn.Parameter], cfg: OptimConfig, index: int = 0
) -> torch.optim.Optimizer:
    """The torch optimizer of stage ``index``."""
    lr, decay = stage_settings(cfg, index)
    fused = _fused(cfg)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=fused)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=decay, fused=fused)


def build_synthesizer_optimizer(
    params: Iterable[nn.Parameter], lr: float, cfg: OptimConfig
) -> torch.optim.Adam:
    """A synthesizer's Adam (``method.sg.lr``), on the stages' kernel choice (``optim.fused``)."""
    return torch.optim.Adam(params, lr=lr, fused=_fused(cfg))


def _fused(cfg: OptimConfig) -> bool | None:
    """torch's ``fused`` argument: None, not False, leaves torch its own default path."""
    return True if cfg.fused else None


def lr_factor(update: int, cfg: OptimConfig, total: int) -> float:
    """The learning rate of update ``update`` (0-based) as a fraction of the base rate: a linear
    warm-up over ``optim.warmup_steps`` (from 1/warmup up to 1), then constant or a cosine decay
    to ``optim.min_lr_ratio`` at update ``total``."""
    if update < cfg.warmup_steps:
        return (update + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total - cfg.warmup_steps, 1)
    progress = min((update - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StageOptimizer:
    """A stage's torch optimizer with the schedule, clipping and accumulation of ``cfg``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: OptimConfig,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        # fp16's loss scaler (decoupled/precision.py): the gradients arrive multiplied by its
        # scale; a disabled one passes everything through.
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.total_updates = 0  # the run's length in updates, for the cosine; set_total()
        self.updates = 0  # optimizer steps taken
        self._accumulated = 0  # backward passes since the last step
        self.last_grad_norm: float | None = None  # before clipping, when clipping is on

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def set_total(self, steps: int) -> None:
        """The run's length in training steps (the cosine decays over it)."""
        self.total_updates = steps // self.cfg.accumulate

    def update(self) -> bool:
        """After a backward pass: step once every ``accumulate`` calls; True when it stepped."""
        self._accumulated += 1
        if self._accumulated < self.cfg.accumulate:
            return False
        # True-sized gradients from here on (the scale is the same for every pass summed).
        self.scaler.unscale_(self.optimizer)
        if self.cfg.accumulate > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(self._accumulated)
        self._accumulated = 0
        if self.cfg.clip_norm > 0:
            norm = nn.utils.clip_grad_norm_(self.params, self.cfg.clip_norm)
            self.last_grad_norm = float(norm)
        factor = lr_factor(self.updates, self.cfg, self.total_updates)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        self.scaler.step(self.optimizer)  # skipped when an fp16 gradient overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
            "accumulated": self._accumulated,
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A stage state saved before this wrapper existed holds the torch optimizer's state
        itself (no ``updates``): it is read as such, at update 0."""
        if "updates" not in state:
            self.optimizer.load_state_dict(state)
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
        self._accumulated = int(state["accumulated"])
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
