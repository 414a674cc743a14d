"""From a Config to ready-to-train stages: where models, synthesizers and optimizers meet."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from decoupled.config import Config, OptimConfig
from decoupled.models import activation_shapes, build_stage_modules
from decoupled.stage import Stage
from decoupled.synthesizer import build_synthesizer


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def num_stages(cfg: Config) -> int:
    """Stages that actually run: backprop keeps the whole model in one place."""
    return 1 if cfg.method.name == "backprop" else cfg.stages


def build_stage(
    cfg: Config,
    index: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device | str = "cpu",
) -> Stage:
    """Stage ``index`` of the model split by ``cfg``, with its synthesizer unless it is the last.

    Every call builds the whole model from ``cfg.seed`` and keeps one slice, so stages built in
    different processes fit together and match a one-stage model weight for weight.
    """
    k = num_stages(cfg)
    modules = build_stage_modules(cfg.model, k, input_shape, num_classes, cfg.seed)
    shapes = activation_shapes(modules, input_shape)
    module = modules[index]
    optimizer = build_optimizer(module.parameters(), cfg.optim)
    synthesizer = sg_optimizer = None
    if index < k - 1 and cfg.method.name in ("dni", "cdni"):
        # Seeded apart from the model so that adding a synthesizer never shifts the model's init.
        torch.manual_seed(cfg.seed + 1000 + index)
        conditioned = num_classes if cfg.method.name == "cdni" else None
        synthesizer = build_synthesizer(shapes[index], cfg.method.sg, conditioned)
        sg_optimizer = torch.optim.Adam(synthesizer.parameters(), lr=cfg.method.sg.lr)
    return Stage(
        index,
        k,
        module,
        optimizer,
        synthesizer,
        sg_optimizer,
        sg_scale=cfg.method.sg.scale,
        history=cfg.method.sg.history,
        device=device,
    )


def build_stages(
    cfg: Config, input_shape: tuple[int, ...], num_classes: int, device: torch.device | str = "cpu"
) -> list[Stage]:
    return [build_stage(cfg, i, input_shape, num_classes, device) for i in range(num_stages(cfg))]
