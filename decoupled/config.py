"""Experiment configuration: one dataclass per component, loaded from YAML, checked as a whole.

The dataclasses are the schema. Field metadata carries what a type cannot say:
``choices`` (allowed values), ``min``/``max`` (inclusive range), ``gt`` (strict lower bound).
Validation lives in ``load_config``; every problem is collected and reported at once, each with
its dotted key path, so a user fixes a config in one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

METHODS = ("backprop", "pipeline", "dni", "cdni")
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass
class DataConfig:
    name: str = field(default="digits", metadata=_choices(*DATASETS))
    root: str = "data"
    batch_size: int = field(default=64, metadata={"min": 1})
    eval_batch_size: int = field(default=512, metadata={"min": 1})
    download: bool = False


@dataclass
class ModelConfig:
    name: str = field(default="fcn", metadata=_choices("fcn", "cnn"))
    # fcn: number of linear layers including the output layer (the paper's "layers").
    # cnn: number of 5x5 conv blocks before the linear classifier.
    layers: int = field(default=3, metadata={"min": 1})
    hidden: int = field(default=256, metadata={"min": 1})
    batch_norm: bool = True
    # Block index where each stage after the first begins; empty means split as evenly as possible.
    boundaries: list[int] = field(default_factory=list)


@dataclass
class SGConfig:
    # Hidden layers of the synthesizer (0 = linear SG, as in much of the paper).
    layers: int = field(default=1, metadata={"min": 0})
    hidden: int = field(default=256, metadata={"min": 1})
    lr: float = field(default=1e-4, metadata={"gt": 0.0})
    # Multiplies the synthesizer's output before it is used as a gradient (Czarnecki et al. 2017).
    scale: float = field(default=1.0, metadata={"gt": 0.0})
    # Activations kept per stage waiting for their target; older ones are dropped and counted.
    history: int = field(default=64, metadata={"min": 1})


@dataclass
class MethodConfig:
    name: str = field(default="cdni", metadata=_choices(*METHODS))
    sg: SGConfig = field(default_factory=SGConfig)
    # In-process trainer only: steps between a target being computed and its delivery.
    delay: int = field(default=0, metadata={"min": 0})
    # pipeline: micro-batches per batch (GPipe).
    micro_batches: int = field(default=4, metadata={"min": 1})


@dataclass
class OptimConfig:
    name: str = field(default="adam", metadata=_choices("adam", "sgd"))
    lr: float = field(default=1e-3, metadata={"gt": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})


@dataclass
class TrainConfig:
    epochs: int = field(default=20, metadata={"min": 1})
    # When set, overrides epochs: the run stops after this many batches.
    steps: int | None = field(default=None, metadata={"min": 1})
    eval_every: int = field(default=0, metadata={"min": 0})  # steps; 0 = at the end of each epoch
    log_every: int = field(default=10, metadata={"min": 1})
    progress: bool = True


@dataclass
class RuntimeConfig:
    backend: str = field(default="ray", metadata=_choices("ray", "local"))
    address: str | None = None
    transport: str = field(default="auto", metadata=_choices("auto", "ray", "torch"))
    # "auto" or a number of GPUs per stage actor (fractions share a device).
    gpus_per_stage: float | str = "auto"
    cpus_per_stage: float = field(default=1.0, metadata={"gt": 0.0})
    channel_capacity: int = field(default=4, metadata={"min": 1})
    # Ray runtime: targets are applied in strict step order with one batch in flight.
    lockstep: bool = False
    max_failures: int = field(default=3, metadata={"min": 0})
    timeout_s: float = field(default=600.0, metadata={"gt": 0.0})


@dataclass
class WandbConfig:
    mode: str = field(default="disabled", metadata=_choices("disabled", "offline", "online"))
    project: str = "decoupled"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = field(default=0, metadata={"min": 0})  # steps; 0 = only at the end
    keep: int = field(default=2, metadata={"min": 1})


@dataclass
class Config:
    seed: int = 0
    stages: int = field(default=2, metadata={"min": 1})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
