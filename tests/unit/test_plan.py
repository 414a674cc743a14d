"""Placement decisions: GPUs per stage and the data plane, as pure functions."""

from __future__ import annotations

import pytest

from decoupled.config import ConfigError
from decoupled.ray_runtime.plan import StageResources, choose_transport, plan_resources


@pytest.mark.parametrize(
    ("stages", "requested", "cluster_gpus", "expected"),
    [
        (2, "auto", 0.0, 0.0),  # CPU-only cluster
        (2, "auto", 2.0, 1.0),  # a GPU for each stage
        (2, "auto", 8.0, 1.0),  # more than enough: still one each
        (3, "auto", 1.0, 0.33),  # three stages share one GPU
        (4, "auto", 2.0, 0.5),
        (2, 0.5, 1.0, 0.5),  # explicit sharing
        (2, 0, 4.0, 0.0),  # explicitly on CPU
    ],
)
def test_gpus_per_stage(
    stages: int, requested: float | str, cluster_gpus: float, expected: float
) -> None:
    resources = plan_resources(stages, requested, 1.0, cluster_gpus)
    assert resources.gpus == expected
    assert resources.gpus * stages <= cluster_gpus + 1e-9


def test_asking_for_more_gpus_than_the_cluster_has_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"needs 4 GPUs for 4 stages; the cluster has 2"):
        plan_resources(4, 1, 1.0, 2.0)


def test_torch_threads_follow_the_cpu_share() -> None:
    assert StageResources(cpus=0.5, gpus=0).torch_threads == 1
    assert StageResources(cpus=4, gpus=0).torch_threads == 4


@pytest.mark.parametrize(
    ("requested", "gpus", "expected"),
    [
        ("auto", 0.0, ("torch", "gloo")),
        ("auto", 1.0, ("torch", "nccl")),
        ("auto", 0.5, ("torch", "gloo")),  # NCCL cannot run two ranks on one GPU
        ("torch", 0.25, ("torch", "gloo")),
        ("ray", 1.0, ("ray", "object_store")),
    ],
)
def test_transport_choice(requested: str, gpus: float, expected: tuple[str, str]) -> None:
    assert choose_transport(requested, gpus) == expected
