"""summary.json stays strict JSON whatever the figures: a diverged value is written as null."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from decoupled.metrics import (
    build_summary,
    steady_samples_per_s,
    summary_stage_figures,
    write_summary,
)
from tests.conftest import small_config


def test_non_finite_figures_become_null_at_every_level(tmp_path: Path) -> None:
    summary = build_summary(
        small_config(),
        num_stages=2,
        steps=10,
        wall_s=1.0,
        samples=640,
        train_loss=math.nan,
        test_accuracy=0.5,
        stages=[{"index": 0, "sg_loss": math.inf, "staleness_counts": {"2": 3}}],
    )
    write_summary(summary, tmp_path)

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert written["train_loss"] is None and written["stages"][0]["sg_loss"] is None
    assert written["stages"][0]["staleness_counts"] == {"2": 3}


def test_steady_rate_leaves_out_start_up_and_the_end() -> None:
    # 100 steps of batch 10; a slow start (step 10 at 5 s), then 1 step per 0.1 s, and a final
    # record at the end that includes the last evaluation.
    progress = [(10, 5.0), (20, 6.0), (50, 9.0), (90, 13.0), (100, 30.0)]
    rate = steady_samples_per_s(progress, first_step=0, total_steps=100, batch=10)
    assert rate == pytest.approx((90 - 20) * 10 / (13.0 - 6.0))
    # Resumed at step 50: the window opens at 60 and there is no second point in it.
    assert steady_samples_per_s(progress, first_step=50, total_steps=100, batch=10) is None
    assert steady_samples_per_s([], first_step=0, total_steps=100, batch=10) is None


def test_summary_stage_figures_keep_gpu_figures_only_where_reported() -> None:
    cpu = summary_stage_figures({"index": 0, "samples_per_s": 5.0, "device": "cpu"})
    assert cpu["samples_per_s"] == 5.0 and cpu["sg_loss"] is None
    assert "gpu_mem_mb" not in cpu
    gpu = summary_stage_figures({"index": 1, "gpu_mem_mb": 12.5, "gpu_util": 80.0})
    assert gpu["gpu_mem_mb"] == 12.5 and gpu["gpu_util"] == 80.0
