"""Your own model and data with decoupled, from Python.

The model and the data are functions in this file, named in the config as "module:function";
``decoupled.train`` runs them exactly as ``decoupled train`` would (same run folder, same
summary), in-process here and on Ray actors with ``runtime.backend=ray`` (Ray ships this file to
the actors; on a cluster too, with ``runtime.address``).

    .venv/bin/python examples/custom_model.py                     # cDNI, 2 stages, in-process
    .venv/bin/python examples/custom_model.py runtime.backend=ray method.name=dgl
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import decoupled
from decoupled.config import DataConfig, ModelConfig


def blocks(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """A small residual MLP as four blocks; ``cfg.hidden`` sets its width."""
    width = cfg.hidden

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = x + self.body(x)
            return out

    stem = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), width))
    return [stem, Residual(), Residual(), nn.Linear(width, num_classes)]


def spirals(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two interleaved spirals with noise: 2,000 training and 500 test points, two classes."""
    g = torch.Generator().manual_seed(0)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        t = torch.rand(n, generator=g) * 3 * torch.pi
        r = t / (3 * torch.pi)
        angle = t + y * torch.pi
        x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
        return x + 0.03 * torch.randn(n, 2, generator=g), y

    train_x, train_y = sample(2000)
    test_x, test_y = sample(500)
    return train_x, train_y, test_x, test_y


def main(overrides: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))  # so that "custom_model:..." imports
    summary = decoupled.train(
        {
            "stages": 2,
            "model": {"name": "custom_model:blocks", "hidden": 64},
            "data": {"name": "custom_model:spirals", "batch_size": 64},
            "method": {"name": "cdni"},
            "train": {"epochs": 20, "progress": False},
            "runtime": {"backend": "local"},
        },
        overrides,
        out="runs/custom-model",
        overwrite=True,
    )
    print(f"{summary['method']}: test accuracy {summary['test_accuracy']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
