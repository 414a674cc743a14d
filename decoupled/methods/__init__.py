"""Training methods, each a module on the interface of ``decoupled.methods.base``."""

from __future__ import annotations

from decoupled.config import Config
from decoupled.methods.backprop import Backprop
from decoupled.methods.base import Method, MethodStage, Sends, StageContext
from decoupled.methods.ddp import DDP
from decoupled.methods.delayed import Delayed
from decoupled.methods.dgl import DGL
from decoupled.methods.dni import CDNI, DNI
from decoupled.methods.pipeline import Pipeline

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Backprop, Pipeline, DNI, CDNI, DGL, Delayed, DDP)
}


def method_for(cfg: Config) -> Method:
    """The configured method (``method.name``, already validated against ``METHODS``)."""
    return METHODS[cfg.method.name](cfg)


__all__ = ["METHODS", "Method", "MethodStage", "Sends", "StageContext", "method_for"]
