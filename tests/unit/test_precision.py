"""train.precision: bf16 autocast (CPU here), fp16 loss scaling with unscaled targets, and
fp16 refused where there is no CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from decoupled.cli import main
from decoupled.config import ConfigError, parse_config
from decoupled.data import Dataset
from decoupled.local import LocalTrainer
from decoupled.methods import method_for
from decoupled.methods.base import StageContext
from decoupled.methods.dni import SynthesizerStage
from decoupled.optim import StageOptimizer
from decoupled.precision import Precision
from decoupled.stage import Stage
from decoupled.synthesizer import build_synthesizer
from tests.conftest import DIGITS_CONFIG, small_config

STEPS = 40


def losses(precision: str, method: str, digits: Dataset, device: str = "cpu") -> list[float]:
    """The last stage's training loss at each of STEPS steps, checking that the blocks ran in
    ``precision`` on ``device`` (the in-process trainer's: runtime.gpus_per_stage)."""
    gpus = 1 if device == "cuda" else 0
    cfg = small_config(
        [
            f"method.name={method}",
            f"train.precision={precision}",
            f"train.steps={STEPS}",
            f"runtime.gpus_per_stage={gpus}",
        ]
    )
    trainer = LocalTrainer(cfg, digits)
    assert trainer.stages[0].device.type == device
    seen: list[torch.dtype] = []
    linear = next(m for m in trainer.stages[0].module.modules() if isinstance(m, nn.Linear))
    linear.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    out = []
    for step in range(STEPS):
        trainer.step(step, *trainer.stream.batch(step))
        out.append(trainer.stages[-1].stats.snapshot()["train_loss"])
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    assert seen and set(seen) == {expected}  # autocast ran the blocks in that precision
    return out


@pytest.mark.parametrize("method", ["backprop", "cdni", "pipeline", "dgl", "delayed"])
def test_bf16_on_cpu_trains_close_to_fp32(method: str, digits: Dataset) -> None:
    fp32, bf16 = losses("fp32", method, digits), losses("bf16", method, digits)
    late32, late16 = sum(fp32[-10:]) / 10, sum(bf16[-10:]) / 10
    assert late16 < 0.8 * sum(bf16[:5]) / 5  # it learns
    assert abs(late16 - late32) < 0.05 * late32, (late32, late16)


def test_fp16_loss_scaling_keeps_targets_and_updates_unscaled(digits: Dataset) -> None:
    """A stage whose backward pass is scaled by 2**12 (an enabled loss scaler; fp32 compute,
    so only the scaling differs) sends the same synthetic-gradient target and makes the same
    update as one without."""
    cfg = parse_config({}, ["method.name=dni", "model.layers=3", "model.hidden=16"])
    x, y = digits.train_x[:32], digits.train_y[:32]

    def run(scaler: torch.amp.GradScaler | None) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        linear = nn.Linear(64, 16)
        module = nn.Sequential(nn.Flatten(), linear, nn.ReLU())
        optim = StageOptimizer(torch.optim.SGD(module.parameters(), lr=0.1), cfg.optim, scaler)
        stage = Stage(1, 3, module, optim)
        sg = build_synthesizer((16,), cfg.method.sg, None)
        nn.init.normal_(list(sg.parameters())[-2], std=0.1)  # a non-zero prediction
        method_stage = SynthesizerStage(stage, sg, torch.optim.SGD(sg.parameters(), lr=0.1))
        sends = method_stage.forward(0, x.clone(), y)
        assert sends.backward is not None
        return sends.backward, linear.weight.detach().clone()

    plain_target, plain_weight = run(None)
    scaled = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled_target, scaled_weight = run(scaled)
    assert plain_target.abs().sum() > 0
    torch.testing.assert_close(scaled_target, plain_target)
    torch.testing.assert_close(scaled_weight, plain_weight)
    assert scaled.get_scale() == 2.0**12  # no overflow: the scale stays


def test_an_overflowed_update_is_skipped_and_the_scale_lowered() -> None:
    cfg = parse_config({})
    p = nn.Parameter(torch.ones(2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optim = StageOptimizer(torch.optim.SGD([p], lr=0.1), cfg.optim, scaler)
    stage = Stage(0, 1, nn.Linear(1, 1), optim)
    stage.backward(p.sum() * torch.tensor(float("inf")))
    optim.update()
    assert torch.equal(p.detach(), torch.ones(2)) and scaler.get_scale() == 2.0**9
    assert optim.state_dict()["scaler"]["scale"] == 2.0**9


def test_fp16_is_refused_without_a_cuda_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match=r"train\.precision: fp16 needs a CUDA device"):
        Precision("fp16", "cpu")
    with pytest.raises(ConfigError, match=r"train\.precision: must be one of: fp32, bf16, fp16"):
        parse_config({}, ["train.precision=fp8"])
    argv = ["train", str(DIGITS_CONFIG), "train.precision=fp16", "runtime.backend=local"]
    assert main([*argv, "runtime.gpus_per_stage=0", "--out", str(tmp_path / "r")]) == 2
    assert "train.precision: fp16 needs a CUDA device" in capsys.readouterr().err


def test_fp32_has_no_scaler_state(digits: Dataset) -> None:
    """fp32 checkpoints keep the keys they had before precision existed."""
    cfg = small_config(["method.name=dni"])
    stage = method_for(cfg).build_stage(
        Stage(
            0,
            2,
            nn.Linear(2, 2),
            StageOptimizer(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1), cfg.optim),
        ),
        StageContext((2,), 10, 0),
    )
    state = stage.state_dict()
    assert "scaler" not in state["optimizer"] and "sg_scaler" not in state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["backprop", "cdni", "pipeline", "dgl"])
def test_mixed_precision_on_cuda_trains_close_to_fp32(
    precision: str, method: str, digits: Dataset
) -> None:
    fp32 = losses("fp32", method, digits, "cuda")
    mixed = losses(precision, method, digits, "cuda")
    late32, late = sum(fp32[-10:]) / 10, sum(mixed[-10:]) / 10
    assert late < 0.8 * sum(mixed[:5]) / 5
    # fp16's first steps may overflow at the scaler's initial scale (2**16) and be skipped.
    assert abs(late - late32) < 0.1 * late32, (late32, late)
