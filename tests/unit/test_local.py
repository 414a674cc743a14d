"""The in-process trainer on the embedded digits: the accuracy each method must reach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decoupled.data import Dataset
from decoupled.local import LocalTrainer
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
