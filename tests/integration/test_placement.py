"""GPU placement on a Ray cluster that declares logical GPUs: no CUDA needed.

Ray treats ``num_gpus`` as a plain resource here, so what is checked is what Ray checks before
any CUDA is touched: whether K stage bundles fit on G GPUs, and which GPU each stage gets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from decoupled.ray_runtime.plan import plan_resources
from tests.integration.conftest import logical_cluster

pytestmark = pytest.mark.integration

LOGICAL_GPUS = 2
STAGES = 3


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[None]:
    with logical_cluster(num_gpus=LOGICAL_GPUS):
        yield


@ray.remote
def _gpu_ids() -> list[str]:
    """The GPUs Ray assigned to this task (what a stage actor would see)."""
    return [str(gpu) for gpu in ray.get_gpu_ids()]


@pytest.mark.timeout(120)
def test_three_stages_fit_on_two_gpus_and_share_them(gpu_cluster: None) -> None:
    resources = plan_resources(STAGES, "auto", 0.5, float(LOGICAL_GPUS))
    pg = placement_group([resources.bundle()] * STAGES, strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=60)
        assert ready, f"{STAGES} bundles of {resources.bundle()} did not fit on 2 GPUs"
        ids = ray.get(
            [
                _gpu_ids.options(
                    num_cpus=resources.cpus,
                    num_gpus=resources.gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=i
                    ),
                ).remote()
                for i in range(STAGES)
            ],
            timeout=60,
        )
    finally:
        remove_placement_group(pg)
    assert all(len(gpu) == 1 for gpu in ids)  # each stage sees exactly one device
    per_gpu = Counter(gpu[0] for gpu in ids)
    assert sorted(per_gpu.values()) == [1, 2]  # two stages share a GPU, one has its own


@pytest.mark.timeout(60)
def test_the_old_share_of_g_over_k_never_places_the_last_stage(gpu_cluster: None) -> None:
    """What ``auto`` gave before (2/3 rounded down): one 0.66 share per GPU, the third waits."""
    pg = placement_group([{"CPU": 0.5, "GPU": 0.66}] * STAGES, strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=3)
        assert not ready
    finally:
        remove_placement_group(pg)
