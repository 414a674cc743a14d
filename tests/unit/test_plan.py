"""Placement decisions: GPUs per stage and the data plane, as pure functions."""

from __future__ import annotations

import pytest

from decoupled.config import ConfigError
from decoupled.ray_runtime.plan import StageResources, choose_transport, gpu_share, plan_resources


@pytest.mark.parametrize(
    ("stages", "requested", "cluster_gpus", "expected"),
    [
        (2, "auto", 0.0, 0.0),  # CPU-only cluster
        (2, "auto", 2.0, 1.0),  # a GPU for each stage
        (2, "auto", 8.0, 1.0),  # more than enough: still one each
        (3, "auto", 1.0, 0.3333),  # three stages share one GPU
        (4, "auto", 2.0, 0.5),
        # G does not divide K: a share of G/K (0.66) would leave a stage on no GPU.
        (3, "auto", 2.0, 0.5),
        (4, "auto", 3.0, 0.5),
        (5, "auto", 2.0, 0.3333),
        (7, "auto", 3.0, 0.3333),
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


@pytest.mark.parametrize("stages", range(1, 17))
@pytest.mark.parametrize("gpus", range(1, 9))
def test_auto_shares_always_place_every_stage(stages: int, gpus: int) -> None:
    """Ray puts each fractional share on one GPU: count the stages each GPU can hold."""
    share = gpu_share(stages, float(gpus))
    if share == 1.0:
        assert gpus >= stages
    else:
        assert int(1 / share + 1e-6) * gpus >= stages  # enough slots
        assert share * int(1 / share + 1e-6) <= 1.0  # the slots of one GPU fit on it
        assert share >= 1 / stages - 1e-4  # and no smaller than an even split needs


def test_asking_for_more_gpus_than_the_cluster_has_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"needs 4 GPUs for 4 stages; the cluster has 2"):
        plan_resources(4, 1, 1.0, 2.0)


def test_a_share_that_does_not_divide_a_gpu_is_refused_with_the_one_that_fits() -> None:
    # 3 x 0.66 = 1.98 <= 2 GPUs, but each GPU holds only one 0.66 share.
    with pytest.raises(ConfigError, match=r"hold 2 of the 3 stages; use 0.5 or auto"):
        plan_resources(3, 0.66, 1.0, 2.0)
    with pytest.raises(ConfigError, match=r"fraction of one GPU or whole GPUs"):
        plan_resources(2, 1.5, 1.0, 4.0)
    assert plan_resources(3, 0.5, 1.0, 2.0).gpus == 0.5


def test_bundle_names_gpus_only_when_there_are_some() -> None:
    assert StageResources(cpus=1.0, gpus=0.5).bundle() == {"CPU": 1.0, "GPU": 0.5}
    assert StageResources(cpus=2.0, gpus=0.0).bundle() == {"CPU": 2.0}


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
