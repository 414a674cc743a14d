"""When a run stops, evaluates and logs: pure decisions from the config and the data size."""

from __future__ import annotations

from dataclasses import dataclass

from decoupled.config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int
    eval_every: int
    log_every: int
    checkpoint_every: int = 0  # 0: only at the end

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, steps_per_epoch: int, checkpoint_every: int = 0
    ) -> Schedule:
        total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
        return cls(
            total_steps=total,
            steps_per_epoch=steps_per_epoch,
            eval_every=cfg.eval_every or steps_per_epoch,
            log_every=cfg.log_every,
            checkpoint_every=checkpoint_every,
        )

    def evaluate_after(self, step: int) -> bool:
        """Evaluate once step ``step`` (0-based) is done: every eval_every steps and at the end."""
        done = step + 1
        return done % self.eval_every == 0 or done == self.total_steps

    def checkpoint_after(self, step: int) -> bool:
        """Save a cut once step ``step`` is done: every checkpoint_every steps and at the end."""
        done = step + 1
        every = self.checkpoint_every
        return (every > 0 and done % every == 0) or done == self.total_steps

    def log_after(self, step: int) -> bool:
        done = step + 1
        return done % self.log_every == 0 or done == self.total_steps

    def epoch(self, step: int) -> float:
        return (step + 1) / self.steps_per_epoch
