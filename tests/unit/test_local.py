"""The in-process trainer on the embedded digits: the accuracy each method must reach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from decoupled.cli import main
from decoupled.config import ConfigError
from decoupled.data import Dataset
from decoupled.local import LocalTrainer, local_device
from tests.conftest import digits_config


@pytest.mark.parametrize(("method", "floor"), [("backprop", 0.95), ("cdni", 0.90), ("dni", 0.85)])
def test_default_experiment_reaches_accuracy(
    digits: Dataset, tmp_path: Path, method: str, floor: float
) -> None:
    cfg = digits_config(f"method.name={method}", "runtime.backend=local")
    summary = LocalTrainer(cfg, digits, tmp_path).run()
    assert summary["test_accuracy"] >= floor, summary
    assert summary["steps"] == cfg.train.epochs * (1438 // cfg.data.batch_size)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert len(evals) == cfg.train.epochs  # once per epoch, the last one at the end
    assert evals[-1]["test_accuracy"] == summary["test_accuracy"]
    if method != "backprop":
        assert len(summary["stages"]) == cfg.stages
        for figures in summary["stages"][:-1]:
            assert figures["sg_updates"] > 0
            assert -1.0 <= figures["sg_cosine"] <= 1.0
            assert f"stage{figures['index']}/sg_loss" in records[-2]


def test_the_in_process_device_follows_runtime_gpus_per_stage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    gpu = torch.device("cuda:0")
    assert local_device(0) == torch.device("cpu") and local_device(0.0) == torch.device("cpu")
    assert local_device("auto") == (gpu if torch.cuda.is_available() else torch.device("cpu"))
    if torch.cuda.is_available():
        assert local_device(0.5) == gpu
        return
    with pytest.raises(ConfigError, match=r"runtime\.gpus_per_stage: 0\.5 asks for a GPU"):
        local_device(0.5)
    argv = ["train", "configs/digits.yaml", "runtime.backend=local", "runtime.gpus_per_stage=1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "runtime.gpus_per_stage: 1.0 asks for a GPU" in capsys.readouterr().err
