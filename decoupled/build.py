"""From a Config to ready-to-train stages: where models, methods and optimizers meet."""

from __future__ import annotations

import torch

from decoupled.config import Config
from decoupled.methods import MethodStage, StageContext, method_for
from decoupled.models import activation_shapes, build_stage_modules
from decoupled.optim import StageOptimizer, build_optimizer
from decoupled.precision import Precision
from decoupled.stage import Stage


def num_stages(cfg: Config) -> int:
    """Stages that actually run (backprop keeps the whole model in one place)."""
    return method_for(cfg).num_stages()


def build_stage(
    cfg: Config,
    index: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    device: torch.device | str = "cpu",
) -> MethodStage:
    """Stage ``index`` of the model split by ``cfg``, with its method's parts.

    Every call builds the whole model from ``cfg.seed`` and keeps one slice, so stages built in
    different processes fit together and match a one-stage model weight for weight. The
    caller's RNG state is left as it was.
    """
    method = method_for(cfg)
    k = method.num_stages()
    # Replicas each hold the whole model; a chain splits it.
    parts = 1 if method.replicas else k
    modules = build_stage_modules(cfg.model, parts, input_shape, num_classes, cfg.seed)
    shapes = activation_shapes(modules, input_shape)
    part = 0 if method.replicas else index
    module = modules[part]
    precision = Precision(cfg.train.precision, device)
    optimizer = StageOptimizer(
        build_optimizer(module.parameters(), cfg.optim, index), cfg.optim, precision.scaler()
    )
    stage = Stage(index, k, module, optimizer, device, precision)
    return method.build_stage(stage, StageContext(shapes[part], num_classes, cfg.seed))


def build_stages(
    cfg: Config, input_shape: tuple[int, ...], num_classes: int, device: torch.device | str = "cpu"
) -> list[MethodStage]:
    return [build_stage(cfg, i, input_shape, num_classes, device) for i in range(num_stages(cfg))]
