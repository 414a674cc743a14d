"""The per-stage figures that monitoring adds to a runner's poll: the staleness distribution and,
on a CUDA device, memory and utilisation."""

from __future__ import annotations

import pytest
import torch

from decoupled.data import Dataset
from decoupled.devices import gpu_figures
from decoupled.metrics import stage_record
from tests.conftest import small_config
from tests.unit.test_runner import run_threads


def test_poll_reports_the_whole_runs_staleness_counts(digits: Dataset) -> None:
    cfg = small_config(["method.name=cdni", "stages=3", "train.steps=30"])
    runners = run_threads(cfg, digits)
    for runner in runners:
        poll = runner.poll()
        stats = runner.stage.stats
        if runner.stage.is_last:  # no synthesizer, no targets
            assert "staleness_counts" not in poll.figures
            continue
        assert poll.figures["staleness_counts"] == dict(stats.staleness_counts)
        assert sum(poll.figures["staleness_counts"].values()) == stats.sg_updates > 0
        # It reaches the records like every per-stage figure; CPU stages report no GPU figures.
        record = stage_record(runner.stage.index, poll.figures)
        i = runner.stage.index
        assert record[f"stage{i}/staleness_counts"] == poll.figures["staleness_counts"]
        assert not any(key.startswith(f"stage{i}/gpu_") for key in record)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_figures_count_this_process_memory() -> None:
    device = torch.device("cuda:0")
    before = gpu_figures(device)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    after = gpu_figures(device)
    assert after["gpu_mem_mb"] >= before["gpu_mem_mb"] + 63
    assert after["gpu_max_mem_mb"] >= after["gpu_mem_mb"]
    if "gpu_util" in after:  # only with pynvml installed
        assert 0 <= after["gpu_util"] <= 100
    del block
