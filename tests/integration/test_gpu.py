"""The GPU path: stages on GPUs, shared GPUs, CUDA tensors through both planes, NCCL.

Runs wherever a CUDA device is present and is skipped cleanly elsewhere. Runs that compare
methods go through the command line (``decoupled.cli.main``), the entry point users have."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from decoupled.cli import main
from decoupled.data import Dataset
from decoupled.ray_runtime.controller import train_on_ray
from tests.conftest import DIGITS_CONFIG, digits_config

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


def _train(out: Path, *overrides: str, resume: bool = False) -> dict[str, Any]:
    """``decoupled train configs/digits.yaml OVERRIDES --out OUT``; the run's summary.json."""
    # An even split: a measured one could differ between the two runs a test compares.
    fixed = ["train.progress=false", "model.boundaries=even"]
    argv = ["train", str(DIGITS_CONFIG), *fixed, *overrides, "--out", str(out)]
    assert main([*argv, "--resume"] if resume else argv) == 0
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


# A small FCN, no batch norm: GPipe's update is then exactly backprop's (up to float rounding).
_PIPELINE = ["model.batch_norm=false", "train.steps=8", "optim.lr=0.01", "model.hidden=64"]


def test_pipeline_on_a_shared_gpu_is_backprop_on_the_host(gpu_cluster: int, tmp_path: Path) -> None:
    gpu = _train(
        tmp_path / "gpu",
        *_PIPELINE,
        "stages=2",
        "method.name=pipeline",
        "method.micro_batches=4",
        "runtime.gpus_per_stage=0.5",
    )
    host = _train(
        tmp_path / "host",
        *_PIPELINE,
        "method.name=backprop",
        "runtime.backend=local",
        "runtime.gpus_per_stage=0",
    )
    assert [s["device"] for s in gpu["stages"]] == ["cuda:0", "cuda:0"]
    assert gpu["test_loss"] == pytest.approx(host["test_loss"], rel=1e-3)
    assert gpu["test_accuracy"] == pytest.approx(host["test_accuracy"], abs=0.01)


def test_lockstep_cdni_on_a_shared_gpu_tracks_the_host(gpu_cluster: int, tmp_path: Path) -> None:
    """Lockstep makes the actors compute what the in-process trainer does. Float rounding
    differs between the GPU and the CPU, and Adam turns it on near-zero synthetic gradients
    into lr-sized steps, so the runs agree closely but not bit for bit."""
    common = ["method.name=cdni", "stages=3", "train.steps=40", "model.hidden=64"]
    gpu = _train(tmp_path / "gpu", *common, "runtime.lockstep=true")
    host = _train(tmp_path / "host", *common, "runtime.backend=local", "runtime.gpus_per_stage=0")
    assert all(s["device"] == "cuda:0" for s in gpu["stages"])
    assert all(s["device"] == "cpu" for s in host["stages"])
    assert gpu["test_loss"] == pytest.approx(host["test_loss"], rel=0.05)
    assert gpu["test_accuracy"] == pytest.approx(host["test_accuracy"], abs=0.03)


def test_gpu_figures_reach_the_summary(gpu_cluster: int, tmp_path: Path) -> None:
    summary = _train(tmp_path, "stages=2", "train.steps=60", "runtime.gpus_per_stage=0.5")
    for stage in summary["stages"]:
        assert stage["gpu_mem_mb"] > 0  # the stage's own module and optimizer state
        assert stage["gpu_max_mem_mb"] >= stage["gpu_mem_mb"]
        # nvidia-ml-py is a dependency: the whole device's utilisation is there.
        assert 0 <= stage["gpu_util"] <= 100


def test_a_run_checkpointed_on_the_gpu_resumes_there(gpu_cluster: int, tmp_path: Path) -> None:
    """Stage files hold host tensors; load_state_dict puts them back on the GPU."""
    common = ["stages=2", "runtime.gpus_per_stage=0.5", "checkpoint.every=20"]
    first = _train(tmp_path, *common, "train.steps=40")
    assert first["steps"] == 40
    resumed = _train(tmp_path, *common, "train.steps=80", resume=True)
    assert resumed["steps"] == 80 and resumed["resumed_from"] == 40
    assert all(s["device"] == "cuda:0" for s in resumed["stages"])
    assert resumed["test_accuracy"] > 0.5


def test_the_in_process_trainer_runs_on_the_gpu(tmp_path: Path) -> None:
    """runtime.backend=local with "auto": every stage on cuda:0, and it learns."""
    summary = _train(tmp_path, "stages=2", "train.steps=60", "runtime.backend=local")
    assert [s["device"] for s in summary["stages"]] == ["cuda:0", "cuda:0"]
    assert summary["test_accuracy"] > 0.8
