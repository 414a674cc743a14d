"""The GPU path: stages on GPUs, shared GPUs, CUDA tensors through both planes, NCCL.

Runs wherever a CUDA device is present and is skipped cleanly elsewhere."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from decoupled.data import Dataset
from decoupled.ray_runtime.controller import train_on_ray
from tests.conftest import digits_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[int]:
    gpus = torch.cuda.device_count()
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=gpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        yield gpus
    finally:
        ray.shutdown()


@pytest.mark.parametrize("transport", ["torch", "ray"])
def test_stages_sharing_one_gpu(
    gpu_cluster: int, digits: Dataset, tmp_path: Path, transport: str
) -> None:
    """Two stages on one GPU (fractional shares); CUDA tensors go through host memory."""
    cfg = digits_config(
        "stages=2", "train.epochs=5", "runtime.gpus_per_stage=0.5", f"runtime.transport={transport}"
    )
    summary = train_on_ray(cfg, digits, tmp_path)
    assert summary["transport"] == ("ray" if transport == "ray" else "torch-gloo")
    assert [s["device"] for s in summary["stages"]] == ["cuda:0", "cuda:0"]
    assert summary["test_accuracy"] > 0.9


def test_auto_gives_each_stage_a_gpu_and_nccl(
    gpu_cluster: int, digits: Dataset, tmp_path: Path
) -> None:
    if gpu_cluster < 2:
        pytest.skip("needs two CUDA devices for NCCL between stages")
    cfg = digits_config("stages=2", "train.epochs=5")
    summary = train_on_ray(cfg, digits, tmp_path)
    assert summary["transport"] == "torch-nccl"
    assert all(s["device"] == "cuda:0" for s in summary["stages"])  # each sees its own GPU as 0
    assert summary["test_accuracy"] > 0.9


def test_auto_shares_a_single_gpu(gpu_cluster: int, digits: Dataset, tmp_path: Path) -> None:
    cfg = digits_config("stages=3", "train.steps=60")
    summary = train_on_ray(cfg, digits, tmp_path)
    expected = "torch-nccl" if gpu_cluster >= 3 else "torch-gloo"
    assert summary["transport"] == expected
    assert all(s["device"] == "cuda:0" for s in summary["stages"])
