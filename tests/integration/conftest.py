"""One local Ray cluster per test module, with explicit logical resources; one real two-node
cluster shared by the modules that only submit jobs to it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from tests.integration.cluster import LocalCluster, local_cluster


@contextlib.contextmanager
def logical_cluster(num_gpus: int = 0, num_cpus: int = 4) -> Iterator[None]:
    """A fresh local Ray with ``num_cpus`` logical CPUs and ``num_gpus`` logical GPUs (no CUDA
    needed); address="local": always a new cluster, never one another process left registered."""
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        object_store_memory=150 * 2**20,
        logging_level=logging.WARNING,
    )
    try:
        yield
    finally:
        ray.shutdown()


def actor_of_this_cluster(name: str) -> int:
    """The pid of an actor of class ``name`` of the module's cluster: a ``ray::<name>`` process
    that descends from this one (its raylet's parent), never one of another cluster on this box."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if not title.startswith(f"ray::{name}".encode()):
            continue
        pid = int(entry.name)
        while pid > 1:
            try:
                pid = int(
                    (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError, ValueError):
                break
            if pid == os.getpid():
                return int(entry.name)
    raise AssertionError(f"no {name} of this test's cluster is running")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    with logical_cluster():
        yield


@pytest.fixture(scope="package")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A head, with the job server, and one worker, one CPU each: a two-stage job must put a
    stage on each node. Jobs leave it as they found it, so `ray job submit` and direct jobs
    share one (starting one costs 10-30 s)."""
    with local_cluster(tmp_path_factory.mktemp("ray-two-nodes"), dashboard=True) as cluster:
        yield cluster
