"""Synthetic-gradient models ("synthesizers"): M(h [, y]) ≈ ∂L/∂h.

A synthesizer sits beside stage i and predicts the gradient of the loss with respect to that
stage's output h_i, so the stage can update without waiting for the stages after it. Its last
layer is zero-initialised: before it has seen a single target it predicts exactly zero, so
training starts as "no update" rather than as noise (Jaderberg et al. 2016, section 3).

cDNI conditions the prediction on the label: the one-hot label is appended to the input of an
MLP synthesizer, or stacked as constant planes onto the feature map of a conv synthesizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from decoupled.config import SGConfig


class Synthesizer(nn.Module):
    """Base: maps activations (B, *shape) and optional labels (B,) to a gradient (B, *shape)."""

    net: nn.Sequential

    def __init__(self, activation_shape: tuple[int, ...], num_classes: int | None) -> None:
        super().__init__()
        self.activation_shape = activation_shape
        # None: plain DNI; an int: cDNI, conditioned on one-hot labels of that many classes.
        self.num_classes = num_classes

    @property
    def conditioned(self) -> bool:
        return self.num_classes is not None

    @property
    def output_layer(self) -> nn.Linear | nn.Conv2d:
        """The zero-initialised last layer."""
        layer = self.net[-1]
        assert isinstance(layer, nn.Linear | nn.Conv2d)
        return layer

    def _one_hot(self, labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if labels is None or self.num_classes is None:
            raise ValueError("a label-conditioned synthesizer needs the labels")
        return F.one_hot(labels, self.num_classes).to(dtype)


def _stack(
    layer: Callable[[int, int], nn.Linear | nn.Conv2d],
    width: int,
    out_width: int,
    hidden_layers: int,
    hidden: int,
) -> nn.Sequential:
    """``hidden_layers`` of ``layer`` + ReLU, ``hidden`` wide, then a zero-initialised output
    ``layer`` of ``out_width``; ``layer(in, out)`` builds one layer."""
    layers: list[nn.Module] = []
    for _ in range(hidden_layers):
        layers += [layer(width, hidden), nn.ReLU()]
        width = hidden
    out = layer(width, out_width)
    nn.init.zeros_(out.weight)
    if out.bias is not None:
        nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


class MLPSynthesizer(Synthesizer):
    """Flattens h, appends the one-hot label for cDNI, 0..n hidden ReLU layers, linear output."""

    def __init__(
        self,
        activation_shape: tuple[int, ...],
        num_classes: int | None,
        hidden_layers: int,
        hidden: int,
    ) -> None:
        super().__init__(activation_shape, num_classes)
        features = math.prod(activation_shape)
        width = features + (num_classes or 0)
        self.net = _stack(nn.Linear, width, features, hidden_layers, hidden)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = h.flatten(1)
        if self.conditioned:
            z = torch.cat([z, self._one_hot(labels, z.dtype)], dim=1)
        out: torch.Tensor = self.net(z)
        return out.view_as(h)


def _conv5x5(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 5, padding=2)


class ConvSynthesizer(Synthesizer):
    """5x5 'same' convolutions over the feature map (B, C, H, W); label planes appended for cDNI."""

    def __init__(
        self,
        activation_shape: tuple[int, ...],
        num_classes: int | None,
        hidden_layers: int,
        hidden: int,
    ) -> None:
        super().__init__(activation_shape, num_classes)
        channels = activation_shape[0]
        width = channels + (num_classes or 0)
        self.net = _stack(_conv5x5, width, channels, hidden_layers, hidden)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        z = h
        if self.conditioned:
            planes = self._one_hot(labels, h.dtype)[:, :, None, None]
            z = torch.cat([z, planes.expand(-1, -1, h.shape[2], h.shape[3])], dim=1)
        out: torch.Tensor = self.net(z)
        return out


def build_synthesizer(
    activation_shape: tuple[int, ...], cfg: SGConfig, num_classes: int | None
) -> Synthesizer:
    """A conv synthesizer for feature maps (C, H, W), an MLP for anything else.

    activation_shape: the shape of one sample's activation, without the batch dimension.
    num_classes: set for cDNI (label-conditioned), None for DNI.
    """
    if len(activation_shape) == 3:
        return ConvSynthesizer(activation_shape, num_classes, cfg.layers, cfg.hidden)
    return MLPSynthesizer(activation_shape, num_classes, cfg.layers, cfg.hidden)
