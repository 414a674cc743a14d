"""summary.json stays strict JSON whatever the figures: a diverged value is written as null."""

from __future__ import annotations

import json
import math
from pathlib import Path

from decoupled.metrics import build_summary, write_summary
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
