"""A short job on stage actors with W&B offline: the run file holds the resolved config, the
per-stage figures the driver polled from the actors (against samples seen), and the summary."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from decoupled.cli import main
from tests.conftest import DIGITS_CONFIG
from tests.wandb_records import read_run, run_file

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]


@pytest.mark.timeout(240)
def test_offline_run_file_has_config_per_stage_metrics_and_summary(
    wandb_home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [
        "train",
        str(DIGITS_CONFIG),
        "stages=3",
        "method.name=cdni",
        "train.epochs=10",
        "train.progress=false",
        "runtime.backend=ray",
        "logging.wandb.mode=offline",
        "logging.wandb.tags=[ci]",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    run = read_run(run_file(out))

    # The job's identity: the resolved config, tags and group.
    assert run.config["method"]["name"] == "cdni" and run.config["stages"] == 3
    assert run.config["runtime"]["backend"] == "ray"
    assert list(run.run.tags) == ["cdni", "3-stages", "digits", "ci"]
    assert run.run.run_group == "digits-fcn" and run.run.job_type == "cdni"
    assert run.run.display_name == "run"

    # One x-axis for everything: samples seen.
    axes = {m.name or m.glob_name: m.step_metric for m in run.metrics}
    assert axes["train_loss"] == axes["test_accuracy"] == "samples"
    assert all(axes[f"stage{i}/*"] == "samples" for i in range(3))

    # Per-stage figures as the actors reported them, on every training record.
    train = [row for row in run.history if "train_loss" in row]
    assert len(train) >= 2
    samples = [row["samples"] for row in train]
    assert samples == sorted(samples) and samples[-1] == summary["steps"] * 64
    for row in train:
        for i in range(3):
            assert 0 <= row[f"stage{i}/busy_fraction"] <= 1
            assert row[f"stage{i}/input_wait_s"] >= 0 and f"stage{i}/channel_depth" in row
    for i in (0, 1):  # the stages with a synthesizer
        rows = [row for row in train if f"stage{i}/sg_cosine" in row]
        assert rows, f"stage {i} logged no SG figures"
        for row in rows:
            assert -1 <= row[f"stage{i}/sg_cosine"] <= 1
            assert row[f"stage{i}/staleness_p50"] <= row[f"stage{i}/staleness_p90"]
            hist = row[f"stage{i}/staleness"]
            assert hist["_type"] == "histogram" and sum(hist["values"]) > 0
            assert len(hist["bins"]) == len(hist["values"]) + 1
    assert not any("stage2/sg_cosine" in row for row in train)
    evals = [row for row in run.history if "test_accuracy" in row]
    assert len(evals) == 10

    # The summary: summary.json's figures, and the whole run's staleness distribution.
    assert run.summary["test_accuracy"] == summary["test_accuracy"]
    assert run.summary["method"] == "cdni" and run.summary["steps"] == summary["steps"]
    for i, figures in enumerate(summary["stages"]):
        assert run.summary[f"stage{i}/busy_fraction"] == figures["busy_fraction"]
    for i in (0, 1):
        hist = run.summary[f"stage{i}/staleness"]
        assert sum(hist["values"]) == summary["stages"][i]["sg_updates"]
        centres = [(a + b) / 2 for a, b in itertools.pairwise(hist["bins"])]
        mean = sum(c * n for c, n in zip(centres, hist["values"], strict=True)) / sum(
            hist["values"]
        )
        assert mean == pytest.approx(summary["stages"][i]["staleness_mean"])
    assert run.exit_code == 0
    assert summary["wandb"]["mode"] == "offline" and summary["wandb"]["id"] == run.run.run_id
