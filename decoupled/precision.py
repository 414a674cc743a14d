"""Mixed precision of one stage (``train.precision``): autocast and, for fp16, loss scaling.

``bf16`` and ``fp16`` run each stage's blocks, loss, synthesizer or auxiliary head under
``torch.autocast``; parameters, optimizer state and what crosses a stage boundary stay fp32
(the blocks' output is cast back before it is sent on or differentiated against).

``fp16`` also scales what each stage backpropagates by its own ``GradScaler`` (one per
optimizer: the stage's and its synthesizer's), which unscales the gradients before clipping and
skips an update whose gradients overflowed. A decoupled stage never shares a loss with the
others, so each scale is its own business, and anything a stage sends back is divided by its
scale first: synthetic-gradient targets and true gradients travel unscaled, and a target that
overflowed is dropped rather than fitted. bf16 has fp32's range and needs no scaling; it runs on
CPUs as well. fp16 is refused on a CPU (torch scales fp16 losses on CUDA).
"""

from __future__ import annotations

import contextlib

import torch

from decoupled.config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``name`` (fp32, bf16, fp16) on ``device``."""

    def __init__(self, name: str = "fp32", device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if name == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                f"train.precision: fp16 needs a CUDA device (its loss scaling runs there), and "
                f"this stage runs on {self.device.type}: use bf16 or fp32"
            )
        self.name = name
        self.dtype = DTYPES.get(name)

    @property
    def scaled(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The context forward passes run in (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A fresh loss scaler for one optimizer; a pass-through unless fp16."""
        return torch.amp.GradScaler(self.device.type, enabled=self.scaled)
