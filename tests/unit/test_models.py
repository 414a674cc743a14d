"""The paper's models as block lists, their split into stages, and the setup dry run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decoupled.build import build_stages
from decoupled.config import ConfigError, ModelConfig, block_count, parse_config
from decoupled.methods.dni import SynthesizerStage
from decoupled.models import activation_shapes, build_stage_modules, stage_ranges
from decoupled.synthesizer import ConvSynthesizer, MLPSynthesizer


@pytest.mark.parametrize(
    ("blocks", "stages", "boundaries", "expected"),
    [
        (4, 2, [], [(0, 2), (2, 4)]),
        (5, 3, [], [(0, 2), (2, 4), (4, 5)]),  # extra blocks go to the earlier stages
        (4, 4, [], [(0, 1), (1, 2), (2, 3), (3, 4)]),
        (6, 3, [1, 5], [(0, 1), (1, 5), (5, 6)]),
    ],
)
def test_stage_ranges(
    blocks: int, stages: int, boundaries: list[int], expected: list[tuple[int, int]]
) -> None:
    assert stage_ranges(blocks, stages, boundaries) == expected


@pytest.mark.parametrize(
    ("blocks", "stages", "boundaries"), [(3, 4, []), (4, 2, [0]), (4, 3, [2, 2])]
)
def test_impossible_splits_are_refused(blocks: int, stages: int, boundaries: list[int]) -> None:
    with pytest.raises(ValueError):
        stage_ranges(blocks, stages, boundaries)


def test_fcn_split_computes_what_the_whole_model_computes() -> None:
    cfg = ModelConfig(name="fcn", layers=4, hidden=32, boundaries="even")
    (whole,) = build_stage_modules(cfg, 1, (1, 8, 8), 10, seed=3)
    whole.eval()
    parts = build_stage_modules(cfg, 3, (1, 8, 8), 10, seed=3)
    assert len(parts) == 3 and len(whole) == block_count(cfg)
    x = torch.randn(5, 1, 8, 8)
    h = x
    for part in parts:
        h = part.eval()(h)
    torch.testing.assert_close(h, whole(x))
    assert activation_shapes(parts, (1, 8, 8)) == [(32,), (32,), (10,)]


def test_cnn_stages_use_conv_synthesizers_and_train() -> None:
    cfg = parse_config(
        {},
        [
            "model.name=cnn",
            "model.layers=3",
            "model.hidden=8",
            "model.boundaries=even",
            "stages=3",
            "method.name=cdni",
            "method.sg.layers=1",
            "method.sg.hidden=4",
        ],
    )
    stages = build_stages(cfg, (3, 32, 32), 10)
    assert block_count(cfg.model) == 4  # three conv blocks and the classifier
    synthesizers = [getattr(s, "synthesizer", None) for s in stages]
    assert [type(s) for s in synthesizers] == [ConvSynthesizer, ConvSynthesizer, type(None)]
    first = synthesizers[0]
    assert first is not None and first.activation_shape == (
        8,
        8,
        8,
    )  # two conv blocks, pooled twice
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for seq in range(2):
        h = x
        for stage in stages:
            sends = stage.forward(seq, h, y)
            if sends.backward is not None:
                stages[stage.index - 1].backward(seq, sends.backward)
            h = sends.forward if sends.forward is not None else h
    assert all(s.stats.steps == 2 for s in stages)
    assert stages[0].stats.sg_updates == 2


def test_fcn_boundary_after_the_last_hidden_layer_gives_an_mlp_sg_on_the_hidden_width() -> None:
    cfg = parse_config(
        {},
        [
            "model.layers=3",
            "model.hidden=16",
            "stages=2",
            "model.boundaries=[2]",
            "method.name=dni",
        ],
    )
    first, _ = build_stages(cfg, (1, 8, 8), 10)
    assert isinstance(first, SynthesizerStage)
    assert isinstance(first.synthesizer, MLPSynthesizer)
    assert first.synthesizer.activation_shape == (16,)


def test_a_stage_that_cannot_take_its_input_is_named_at_setup() -> None:
    parts = [nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), nn.Sequential(nn.Linear(9, 2))]
    with pytest.raises(
        ConfigError, match=r"stage 1 cannot take the output of stage 0 \(shape \(8,\)\)"
    ):
        activation_shapes(parts, (1, 8, 8))
