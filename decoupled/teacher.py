"""A generated classification task of tunable difficulty: a deep random teacher network.

Inputs are standard Gaussian vectors; a random tanh network (``depth`` hidden layers of
``width`` units, weights of variance ``gain**2 / fan_in``) maps each to ``classes`` scores, and
the label is the highest score. A deeper teacher, a larger gain (towards the chaotic regime of
tanh networks, Poole et al. 2016), more classes or more input dimensions draw more convoluted
class boundaries, so a student needs more samples and steps to reach a given accuracy; the
number of samples is free, unlike a real dataset's.

Everything is drawn from ``seed`` alone in float64 on the CPU: every process (each Ray actor,
whatever its thread count) labels the same inputs identically. Float32 scores could flip a
near-tie between two classes from one BLAS blocking to another.
"""

from __future__ import annotations

import itertools
import math

import torch

from decoupled.config import TeacherConfig

# Inputs drawn once, after the weights, to centre and scale each class's score: the labelling
# function then depends on the teacher's seed and shape alone, not on the sample counts.
CALIBRATION_SAMPLES = 4096


class Teacher:
    """A random tanh network with per-class score standardisation; ``labels`` is its argmax."""

    def __init__(self, cfg: TeacherConfig, generator: torch.Generator) -> None:
        self.gain = cfg.gain
        widths = [cfg.input_dim] + [cfg.width] * cfg.depth + [cfg.classes]
        self.weights = [
            torch.randn(a, b, generator=generator, dtype=torch.float64) / math.sqrt(a)
            for a, b in itertools.pairwise(widths)
        ]
        calibration = torch.randn(
            CALIBRATION_SAMPLES, cfg.input_dim, generator=generator, dtype=torch.float64
        )
        scores = self._raw_scores(calibration)
        # Without this, one class can own most of the input space by an offset in its score.
        self.mean, self.std = scores.mean(0), scores.std(0).clamp_min(1e-12)

    def _raw_scores(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for w in self.weights[:-1]:
            h = torch.tanh(self.gain * (h @ w))
        return h @ self.weights[-1]

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, input_dim) float64 -> labels (N,) int64."""
        return ((self._raw_scores(x) - self.mean) / self.std).argmax(1)


def generate_teacher(
    cfg: TeacherConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """train x (N, input_dim) float32, train y (N,), test x (M, input_dim), test y (M,)."""
    g = torch.Generator().manual_seed(cfg.seed)
    teacher = Teacher(cfg, g)
    n = cfg.train_samples + cfg.test_samples
    x = torch.randn(n, cfg.input_dim, generator=g, dtype=torch.float64)
    y = teacher.labels(x)
    x32 = x.float()
    split = cfg.train_samples
    return x32[:split], y[:split].clone(), x32[split:], y[split:].clone()


__all__ = ["Teacher", "generate_teacher"]
