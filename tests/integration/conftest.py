"""One local Ray cluster per test module, with explicit logical resources."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    # address="local": always a new cluster, never one another process left registered.
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=150 * 2**20,
        logging_level=logging.WARNING,
    )
    try:
        yield
    finally:
        ray.shutdown()
