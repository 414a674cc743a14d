"""Synthetic-gradient models ("synthesizers"): M(h [, y]) ≈ ∂L/∂h.

A synthesizer sits beside stage i and predicts the gradient of the loss with respect to that
stage's output h_i, so the stage can update without waiting for the stages after it. Its last
layer is zero-initialised: before it has seen a single target it predicts exactly zero, so
training starts as "no update" rather than as noise (Jaderberg et al. 2016, section 3).

cDNI conditions the prediction on the label through a label projection of its own (an
embedding, the same as a bias-free linear layer on the one-hot label), added to the first
layer's pre-activation (per channel for a conv synthesizer). It is initialised as
``nn.Linear(classes, width)`` would be, U(±1/sqrt(classes)): independent of the activation's
width. Appending the one-hot label to the activation instead (the earlier design) gave the label
columns the init of a layer of fan-in ``features + classes``, 5x smaller for 256 features and
10 classes, and the label hardly conditioned the prediction early in training (issue 13;
``bench/peer_dni.py`` measures both, and a fan-in-1 init, U(±1), which did worse). When the
first layer is the output layer (a linear synthesizer) the label term is a per-class offset of
the gradient and starts at zero like the rest of that layer: with zero weights either way, the
two designs are then the same model, and Adam's steps do not depend on the init's scale.

``method.sg.zero_start=false`` keeps PyTorch's default init for the output layer's bias and
gives the label projection a bias of its own at ``nn.Linear(classes, width)``'s default, as
koz4k/dni-pytorch's synthesizers have (the output weights still start at zero): M then starts
from a random constant, each feature within ±1/sqrt(the output layer's fan-in). On
Fashion-MNIST that start was what separated the project's cDNI from the peer's
(docs/accuracy.md, section 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from decoupled.config import SGConfig


class Synthesizer(nn.Module):
    """Base: maps activations (B, *shape) and optional labels (B,) to a gradient (B, *shape);
    for sequences, activations (B, T, D) and labels (B, T) (a label per token)."""

    net: nn.Sequential

    def __init__(self, activation_shape: tuple[int, ...], num_classes: int | None) -> None:
        super().__init__()
        self.activation_shape = activation_shape
        # None: plain DNI; an int: cDNI, conditioned on labels of that many classes.
        self.num_classes = num_classes
        self.label: nn.Embedding | None = None
        # With zero_start off (cDNI): the label projection's own bias, (width,).
        self.label_bias: nn.Parameter | None = None

    @property
    def conditioned(self) -> bool:
        return self.num_classes is not None

    @property
    def output_layer(self) -> nn.Linear | nn.Conv2d:
        """The zero-initialised last layer."""
        layer = self.net[-1]
        assert isinstance(layer, nn.Linear | nn.Conv2d)
        return layer

    def _init_label(self, hidden_layers: int, zero_start: bool) -> None:
        """The label embedding (classes, width of the first layer's output), for cDNI; with
        ``zero_start`` off, its bias too."""
        if self.num_classes is None:
            return
        first = self.net[0]
        assert isinstance(first, nn.Linear | nn.Conv2d)
        width = first.weight.shape[0]
        self.label = nn.Embedding(self.num_classes, width)
        bound = 1.0 / math.sqrt(self.num_classes)
        if hidden_layers == 0:
            nn.init.zeros_(self.label.weight)  # part of the output layer: "no update" at first
        else:
            nn.init.uniform_(self.label.weight, -bound, bound)
        if not zero_start:
            self.label_bias = nn.Parameter(torch.empty(width).uniform_(-bound, bound))

    def _label_term(self, labels: torch.Tensor | None) -> torch.Tensor:
        """(B, width), or (B, T, width): the embedding of each sample's (or token's) label."""
        if labels is None or self.label is None:
            raise ValueError("a label-conditioned synthesizer needs the labels")
        out: torch.Tensor = self.label(labels)
        if self.label_bias is not None:
            out = out + self.label_bias
        return out

    def _forward(self, z: torch.Tensor, labels: torch.Tensor | None, spatial: bool) -> torch.Tensor:
        """The stack on input z, the label term (broadcast over H, W if ``spatial``; over T
        for a sequence with one label per sample) added to the first layer's pre-activation."""
        z = self.net[0](z)
        if self.conditioned:
            term = self._label_term(labels)
            if spatial:
                term = term[:, :, None, None]
            elif term.dim() < z.dim():
                term = term[:, None, :]
            z = z + term
        out: torch.Tensor = self.net[1:](z)
        return out


def _stack(
    layer: Callable[[int, int], nn.Linear | nn.Conv2d],
    width: int,
    out_width: int,
    hidden_layers: int,
    hidden: int,
    zero_start: bool = True,
) -> nn.Sequential:
    """``hidden_layers`` of ``layer`` + ReLU, ``hidden`` wide, then an output ``layer`` of
    ``out_width`` with zero weights (and a zero bias when ``zero_start``); ``layer(in, out)``
    builds one layer."""
    layers: list[nn.Module] = []
    for _ in range(hidden_layers):
        layers += [layer(width, hidden), nn.ReLU()]
        width = hidden
    out = layer(width, out_width)
    nn.init.zeros_(out.weight)
    if out.bias is not None and zero_start:
        nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


class MLPSynthesizer(Synthesizer):
    """Flattens h, 0..n hidden ReLU layers, linear output; a label embedding for cDNI.

    ``per_token``: h is a sequence (B, T, D) and the MLP runs on each token's D-vector alone
    (the same weights at every position, as a transformer's own MLP), conditioned for cDNI on
    that token's label (B, T), its next-token target."""

    def __init__(
        self,
        activation_shape: tuple[int, ...],
        num_classes: int | None,
        hidden_layers: int,
        hidden: int,
        per_token: bool = False,
        zero_start: bool = True,
    ) -> None:
        super().__init__(activation_shape, num_classes)
        self.per_token = per_token
        features = activation_shape[-1] if per_token else math.prod(activation_shape)
        self.net = _stack(nn.Linear, features, features, hidden_layers, hidden, zero_start)
        self._init_label(hidden_layers, zero_start)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.per_token:
            return self._forward(h, labels, spatial=False)  # nn.Linear maps the last dim
        return self._forward(h.flatten(1), labels, spatial=False).view_as(h)


def _conv5x5(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 5, padding=2)


class ConvSynthesizer(Synthesizer):
    """5x5 'same' convolutions over the feature map (B, C, H, W); for cDNI a label embedding
    added to the first convolution's channels at every position."""

    def __init__(
        self,
        activation_shape: tuple[int, ...],
        num_classes: int | None,
        hidden_layers: int,
        hidden: int,
        zero_start: bool = True,
    ) -> None:
        super().__init__(activation_shape, num_classes)
        channels = activation_shape[0]
        self.net = _stack(_conv5x5, channels, channels, hidden_layers, hidden, zero_start)
        self._init_label(hidden_layers, zero_start)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(h, labels, spatial=True)


def build_synthesizer(
    activation_shape: tuple[int, ...], cfg: SGConfig, num_classes: int | None
) -> Synthesizer:
    """A conv synthesizer for feature maps (C, H, W), a per-token MLP for sequences (T, D), an
    MLP for vectors.

    activation_shape: the shape of one sample's activation, without the batch dimension.
    num_classes: set for cDNI (label-conditioned), None for DNI.
    """
    if len(activation_shape) == 3:
        return ConvSynthesizer(
            activation_shape, num_classes, cfg.layers, cfg.hidden, zero_start=cfg.zero_start
        )
    per_token = len(activation_shape) == 2
    return MLPSynthesizer(
        activation_shape, num_classes, cfg.layers, cfg.hidden, per_token, cfg.zero_start
    )


def fit_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The synthesizer's training loss: squared error summed over a sample's features, averaged
    over the batch. prediction, target: (B, ...) gradients of the batch-mean loss.

    Not ``F.mse_loss``, the mean over features too: the targets' entries are tiny (each is
    O(1/B) and shared by thousands of features), so the mean's gradients on M's weights fall to
    about 1e-9, under Adam's eps (1e-8), which then throttles every step. Summing over features
    (as koz4k/dni-pytorch does) keeps Adam's steps at their intended size; on the MNIST subset
    of ``bench/peer_dni.py`` it took cDNI's error from 5.08% to 4.90% (docs/accuracy.md)."""
    return (prediction - target).square().flatten(1).sum(1).mean()
