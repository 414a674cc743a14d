"""``model.boundaries=auto``: the split by measured cost, as a pure decision and end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

import decoupled
from decoupled.balance import balanced, partition, resolve_boundaries
from decoupled.checkpoint import CheckpointError, Cut
from decoupled.config import parse_config
from decoupled.data import Dataset
from decoupled.local import LocalTrainer
from tests.conftest import small_config


@pytest.mark.parametrize(
    ("costs", "overheads", "stages", "expected"),
    [
        ([1, 1, 1, 6], [0, 0, 0, 0], 2, [3]),  # the heavy last block alone
        ([6, 1, 1, 1], [0, 0, 0, 0], 2, [1]),  # the heavy first block alone
        ([1] * 8, [0] * 8, 2, [4]),  # identical blocks: even
        ([1] * 8, [0] * 8, 4, [2, 4, 6]),
        ([1.0, 1.02, 0.98, 1.01], [0] * 4, 2, [2]),  # noise within the tolerance: even
        ([1, 1, 1, 1], [3, 3, 3, 3], 2, [1]),  # boundary work counts against the stage
        ([1, 2, 3, 4, 5], [0] * 5, 3, [3, 4]),  # 6 | 4 | 5
    ],
)
def test_partition_minimises_the_slowest_stage(
    costs: list[float], overheads: list[float], stages: int, expected: list[int]
) -> None:
    assert partition(costs, overheads, stages) == expected


def test_partition_refuses_more_stages_than_blocks() -> None:
    with pytest.raises(ValueError, match="cannot split 2 blocks into 3 stages"):
        partition([1, 1], [0, 0], 3)


def _heavy_first_block(method: str) -> list[str]:
    # A 4096-wide input into 32 units: the first block does ~100x the work of each other one.
    return [f"method.name={method}", "stages=2", "model.layers=4", "model.hidden=32"]


def test_auto_puts_a_heavier_block_alone_on_a_stage() -> None:
    cfg = parse_config({}, [*_heavy_first_block("dni"), "model.boundaries=auto"])
    balance = resolve_boundaries(cfg, (1, 64, 64), 10)
    assert balance.how == "auto" and balance.boundaries == [1]  # even would be [2]
    assert balance.stage_costs_ms is not None and len(balance.stage_costs_ms) == 2
    assert balance.stage_costs_ms[0] > balance.stage_costs_ms[1]
    even = resolve_boundaries(
        parse_config({}, [*_heavy_first_block("dni"), "model.boundaries=even"]), (1, 64, 64), 10
    )
    assert even.boundaries == [2] and even.how == "even"


def test_the_split_reaches_the_summary_and_a_resumed_run_keeps_it(
    digits: Dataset, tmp_path: Path
) -> None:
    cfg = small_config(["method.name=cdni", "stages=2", "model.boundaries=auto", "train.steps=4"])
    summary = LocalTrainer(cfg, digits).run()
    assert summary["balance"] == "auto"
    assert len(summary["boundaries"]) == 1 and len(summary["stage_costs_ms"]) == 2
    cut = Cut(tmp_path, 4, 2, {"model": {"boundaries": [3]}})
    resumed, balance = balanced(cfg, digits.input_shape, digits.num_classes, resume=cut)
    assert resumed.model.boundaries == [3] and balance.how == "resumed"


@pytest.mark.parametrize("method", ["cdni", "pipeline"])
def test_an_even_run_resumes_with_even(method: str, tmp_path: Path) -> None:
    """The cut records the split it resolved to ([2]), never the word "even": resuming with the
    same "even" must be accepted (it was refused on a GPU run)."""
    common = [f"method.name={method}", "stages=2", "checkpoint.every=4"]
    cfg = small_config([*common, "train.steps=4"])
    decoupled.train(cfg, out=tmp_path / "run")
    resumed = decoupled.train(small_config([*common, "train.steps=8"]), resume=tmp_path / "run")
    assert resumed["steps"] == 8


def test_a_resumed_run_that_asks_for_another_split_is_refused(
    digits: Dataset, tmp_path: Path
) -> None:
    cfg = small_config(["method.name=cdni", "stages=2"])  # even: [2] of 4 blocks
    same = Cut(tmp_path, 4, 2, {"model": {"boundaries": [2]}})
    resumed, _ = balanced(cfg, digits.input_shape, digits.num_classes, resume=same)
    assert resumed.model.boundaries == [2]
    other = Cut(tmp_path, 4, 2, {"model": {"boundaries": [1]}})
    with pytest.raises(CheckpointError, match=r"model.boundaries: checkpoint has \[1\]"):
        balanced(cfg, digits.input_shape, digits.num_classes, resume=other)
    # Replicas hold every block: their cuts record [] whatever the word.
    ddp = parse_config({}, ["method.name=ddp", "stages=2", "model.boundaries=even"])
    whole = Cut(tmp_path, 4, 2, {"model": {"boundaries": []}})
    assert (
        balanced(ddp, digits.input_shape, digits.num_classes, resume=whole)[0].model.boundaries
        == []
    )
