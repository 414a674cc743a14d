"""The CIFAR ResNet as a list of blocks: shapes chain, it splits into stages, and it trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decoupled.build import build_stages
from decoupled.config import ConfigError, ModelConfig, block_count, parse_config
from decoupled.models import ResidualBlock, activation_shapes, build_blocks, build_stage_modules
from decoupled.synthesizer import ConvSynthesizer

TINY = ModelConfig(name="resnet", layers=2, hidden=4)


@pytest.mark.parametrize(
    ("input_shape", "sides"), [((3, 32, 32), (32, 16, 8)), ((1, 28, 28), (28, 14, 7))]
)
def test_every_block_is_a_stage_and_the_shapes_chain(
    input_shape: tuple[int, ...], sides: tuple[int, int, int]
) -> None:
    blocks = block_count(TINY)
    assert blocks == 3 * 2 + 2
    modules = build_stage_modules(TINY, blocks, input_shape, 10, seed=0)
    a, b, c = sides
    assert activation_shapes(modules, input_shape) == [
        (4, a, a),  # stem
        (4, a, a),
        (4, a, a),
        (8, b, b),  # the second residual stage halves the map, doubles the channels
        (8, b, b),
        (16, c, c),
        (16, c, c),
        (10,),  # pooled, then the linear head
    ]


def test_shortcuts_project_only_where_the_shape_changes() -> None:
    residual = [
        b for b in build_blocks(TINY, (3, 32, 32), 10, seed=0) if isinstance(b, ResidualBlock)
    ]
    projected = [not isinstance(b.shortcut, nn.Identity) for b in residual]
    assert projected == [False, False, True, False, True, False]


def test_split_computes_what_the_whole_model_computes() -> None:
    (whole,) = build_stage_modules(TINY, 1, (3, 16, 16), 10, seed=5)
    parts = build_stage_modules(TINY, 3, (3, 16, 16), 10, seed=5)
    x = torch.randn(3, 3, 16, 16)
    h = x
    for part in parts:
        h = part.eval()(h)
    torch.testing.assert_close(h, whole.eval()(x))


def test_backprop_fits_a_batch() -> None:
    model = nn.Sequential(*build_blocks(TINY, (3, 16, 16), 10, seed=0))
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        torch.autograd.backward(loss)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_cdni_stages_get_conv_synthesizers_and_step() -> None:
    cfg = parse_config(
        {},
        [
            "model.name=resnet",
            "model.layers=1",
            "model.hidden=4",
            "stages=2",
            "method.name=cdni",
            "method.sg.layers=0",
        ],
    )
    stages = build_stages(cfg, (3, 16, 16), 10)
    first = stages[0].synthesizer
    assert isinstance(first, ConvSynthesizer) and first.activation_shape == (8, 8, 8)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for seq in range(2):
        result = stages[0].train_step(seq, x, y)
        assert result.activations is not None
        out = stages[1].train_step(seq, result.activations, y)
        assert out.target is not None
        stages[0].train_synthesizer(seq, out.target)
    assert stages[0].stats.steps == stages[1].stats.steps == 2
    assert stages[0].stats.sg_updates == 2


def test_too_many_stages_names_the_resnet_blocks() -> None:
    with pytest.raises(ConfigError, match=r"stem \+ 3 x model.layers residual blocks"):
        parse_config({}, ["model.name=resnet", "model.layers=1", "stages=6"])
