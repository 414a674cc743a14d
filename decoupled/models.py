"""The paper's models, a CIFAR ResNet and a GPT (``decoupled/transformer.py``) as explicit lists
of blocks, and their split into stages.

A model is a list of blocks; stage k owns blocks[start_k:end_k]. Splitting is explicit (by block
index from ``model.boundaries``, or as even as possible), never by tracing. Every process builds
the whole model from the same seed and keeps its own slice, so a K-stage run starts from exactly
the weights a one-stage backprop run starts from.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from decoupled.config import ConfigError, ModelConfig
from decoupled.factories import is_factory, load_factory
from decoupled.transformer import embeds_tokens, gpt_blocks


def fcn_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """The paper's FCN: (layers - 1) x [Linear(hidden), BN, ReLU], then Linear(num_classes)."""
    width = 1
    for d in input_shape:
        width *= d
    blocks: list[nn.Module] = []
    for k in range(cfg.layers - 1):
        layers: list[nn.Module] = [nn.Flatten()] if k == 0 else []
        layers.append(nn.Linear(width, cfg.hidden))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(cfg.hidden))
        layers.append(nn.ReLU())
        blocks.append(nn.Sequential(*layers))
        width = cfg.hidden
    head: list[nn.Module] = [nn.Flatten()] if cfg.layers == 1 else []
    blocks.append(nn.Sequential(*head, nn.Linear(width, num_classes)))
    return blocks


def cnn_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> list[nn.Module]:
    """The paper's CIFAR CNN: layers x [Conv 5x5 (hidden), BN, ReLU], max-pooling after the first
    two, then a linear classifier over the flattened feature map."""
    channels = input_shape[0]
    blocks: list[nn.Module] = []
    for k in range(cfg.layers):
        layers: list[nn.Module] = [nn.Conv2d(channels, cfg.hidden, 5, padding=2)]
        if cfg.batch_norm:
            layers.append(nn.BatchNorm2d(cfg.hidden))
        layers.append(nn.ReLU())
        if k < 2:
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        blocks.append(nn.Sequential(*layers))
        channels = cfg.hidden
    with torch.no_grad():
        features = nn.Sequential(*blocks)(torch.zeros(1, *input_shape)).numel()
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes)))
    return blocks


class ResidualBlock(nn.Module):
    """He et al.'s basic block: relu(body(x) + shortcut(x)), the body two 3x3 convs, the
    shortcut the identity or, where the shape changes, a strided 1x1 conv."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, batch_norm: bool) -> None:
        super().__init__()

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=not batch_norm),
            norm(channels_out),
            nn.ReLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=not batch_norm),
            norm(channels_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=not batch_norm),
                norm(channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet_blocks(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int
) -> list[nn.Module]:
    """He et al.'s CIFAR ResNet-(6n+2), n = ``layers``: a 3x3 conv stem of ``hidden`` channels,
    three residual stages of n residual blocks (``hidden``, 2x, 4x channels; the second and third
    stages halve the feature map), then global average pooling and a linear head.

    Every residual block is a block of its own, not every residual stage: with 3n + 2 blocks of
    similar cost, K stages can be cut where their costs balance.
    """
    channels = input_shape[0]
    stem: list[nn.Module] = [nn.Conv2d(channels, cfg.hidden, 3, padding=1, bias=not cfg.batch_norm)]
    if cfg.batch_norm:
        stem.append(nn.BatchNorm2d(cfg.hidden))
    blocks: list[nn.Module] = [nn.Sequential(*stem, nn.ReLU())]
    channels = cfg.hidden
    for stage in range(3):
        width = cfg.hidden * 2**stage
        for k in range(cfg.layers):
            stride = 2 if stage > 0 and k == 0 else 1
            blocks.append(ResidualBlock(channels, width, stride, cfg.batch_norm))
            channels = width
    blocks.append(
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    )
    return blocks


def build_blocks(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> list[nn.Module]:
    """All blocks of the model, initialised from ``seed`` alone (same weights in every process).

    The layers draw their initial weights from torch's global RNG, so it is seeded inside a fork:
    building a model leaves the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_factory(cfg.name):
            return user_blocks(cfg, input_shape, num_classes)
        if cfg.name == "fcn":
            return fcn_blocks(cfg, input_shape, num_classes)
        if cfg.name == "cnn":
            return cnn_blocks(cfg, input_shape, num_classes)
        if cfg.name == "resnet":
            return resnet_blocks(cfg, input_shape, num_classes)
        if cfg.name == "gpt":
            return gpt_blocks(cfg, input_shape, num_classes)
    raise ValueError(f"model.name: unknown model {cfg.name!r}")


def even_boundaries(num_blocks: int, stages: int) -> list[int]:
    """Boundaries as even as possible, the extra blocks going to the earlier stages."""
    size, extra = divmod(num_blocks, stages)
    boundaries, edge = [], 0
    for k in range(stages - 1):
        edge += size + (1 if k < extra else 0)
        boundaries.append(edge)
    return boundaries


def user_blocks(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int
) -> list[nn.Module]:
    """``model.name: "module:function"``: the blocks the user's function returns, checked to be
    modules that chain on the input (a dry run names the two blocks that do not fit)."""
    made = load_factory(cfg.name, "model.name")(cfg, input_shape, num_classes)
    blocks = list(made) if isinstance(made, list | tuple | nn.ModuleList) else None
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise ConfigError(
            f"model.name: {cfg.name} must return a non-empty list of nn.Module blocks, "
            f"got {type(made).__name__}"
        )
    output_shapes(
        blocks,
        input_shape,
        lambda k: f"model.name: block {k} ({type(blocks[k]).__name__})",
        lambda k: f"the output of block {k} ({type(blocks[k]).__name__})",
    )
    return blocks


def stage_ranges(
    num_blocks: int, stages: int, boundaries: list[int] | str
) -> list[tuple[int, int]]:
    """[start, end) block indices of each stage. ``[]`` or "even": as even as possible.
    "auto" must have been resolved into a list first (``decoupled.balance``)."""
    if not 1 <= stages <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks into {stages} stages")
    if boundaries == "auto" and stages > 1:
        raise ValueError(
            "model.boundaries='auto' is decided once per run by decoupled.balance."
            "resolve_boundaries; build stages from its explicit boundaries"
        )
    if isinstance(boundaries, str) or not boundaries:
        boundaries = even_boundaries(num_blocks, stages)
    if len(boundaries) != stages - 1:
        raise ValueError(f"{stages} stages need {stages - 1} boundaries, got {boundaries}")
    edges = [0, *boundaries, num_blocks]
    ranges = list(itertools.pairwise(edges))
    if any(start >= end for start, end in ranges):
        raise ValueError(f"boundaries {boundaries} must increase within 1..{num_blocks - 1}")
    return ranges


def build_stage_modules(
    cfg: ModelConfig, stages: int, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> list[nn.Sequential]:
    """The model split into ``stages`` sequential modules, in order."""
    blocks = build_blocks(cfg, input_shape, num_classes, seed)
    return [
        nn.Sequential(*blocks[start:end])
        for start, end in stage_ranges(len(blocks), stages, cfg.boundaries)
    ]


def activation_shapes(
    modules: list[nn.Sequential], input_shape: tuple[int, ...]
) -> list[tuple[int, ...]]:
    """Per-sample output shape of each stage, found by a dry run on a batch of two (BN needs >1).

    A block that does not accept its predecessor's output fails here, at setup, naming the stage.
    """
    return output_shapes(
        modules, input_shape, lambda k: f"stage {k}", lambda k: f"the output of stage {k}"
    )


def output_shapes(
    parts: Sequence[nn.Module],
    input_shape: tuple[int, ...],
    name: Callable[[int], str],
    output: Callable[[int], str],
) -> list[tuple[int, ...]]:
    """Per-sample output shape of each part in turn, by a dry run (inference mode, a batch of
    two); a part that cannot take what comes before it is a ConfigError naming both, as
    ``name(k)`` and ``output(k - 1)``."""
    shapes: list[tuple[int, ...]] = []
    x = example_input(parts[0], input_shape, 2) if parts else torch.zeros(0)
    with torch.no_grad():
        for k, part in enumerate(parts):
            was_training = part.training
            part.eval()
            try:
                x = part(x)
            except Exception as err:
                source = "the input" if k == 0 else output(k - 1)
                raise ConfigError(
                    f"{name(k)} cannot take {source} (shape {tuple(x.shape[1:])}): {err}"
                ) from None
            finally:
                part.train(was_training)
            shapes.append(tuple(x.shape[1:]))
    return shapes


def example_input(
    first: nn.Module, input_shape: tuple[int, ...], batch: int, random: bool = False
) -> torch.Tensor:
    """A batch (B, *input_shape) that a model starting with block ``first`` takes, to dry-run or
    time it: token ids (B, T) int64 for a model that embeds tokens, else floats; zeros, or drawn
    from torch's RNG if ``random``."""
    embedding = embeds_tokens(first)
    if embedding is not None:
        if not random:
            return torch.zeros(batch, *input_shape, dtype=torch.int64)
        return torch.randint(0, embedding.vocab, (batch, *input_shape))
    return torch.randn(batch, *input_shape) if random else torch.zeros(batch, *input_shape)
