"""Losing a worker node of a real local Ray cluster mid-run: its stages move and the run finishes.

A head of one CPU and two workers of 6 and 2 CPUs run a two-stage job of one CPU per stage: Ray
packs both stages on the larger worker. Once the first checkpoint cut is sealed, the test stops
every process of that node (SIGSTOP: raylet, agents and actors; a machine that hung, whose
kernel still accepts connections that nothing answers). The controller must notice (the stage
answers no poll within runtime.stall_timeout_s), place both stages again on the nodes left
(the smaller worker holds them), resume from the last sealed cut, and finish.

Ray's health checks are left at their defaults on purpose: until the GCS marks the hung node
dead it still counts the 4 CPUs it had free, which makes it Ray's first choice for a new
placement group of two bundles, and a group placed there waits (more than 120 s here, measured
with the exclusion off). The controller must not wait for that: its probe finds the node's
raylet silent, its new placement group keeps off that node explicitly, and is placed within
PLACED_S of the restart being reported (the test watches the GCS's placement groups as a second
driver). A node killed outright refuses connections, which the GCS gets over by itself in 1-2 s
(also measured), so a hung node is the case that tells the exclusion apart. Which node holds a
stage is read from the processes of each node's session (a Ray worker titled
``ray::StageActor...``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DIGITS_CONFIG
from tests.integration.cluster import (
    LocalCluster,
    hang_the_large_worker,
    local_cluster,
    run_records,
    wait_until,
)

pytestmark = pytest.mark.integration

STEPS = 400
EVERY = 25
# A hung stage is noticed when a poll goes unanswered for STALL_S; far below the 60 s limit on
# a control call, so only the failure itself can have triggered the restart.
STALL_S = 10
NOTICE_S = STALL_S + 15.0
PLACED_S = 3.0
# The lost node must look better to Ray than the nodes left: it still shows free CPUs after
# the loss (6 - 2 stages), and more than any live node.
WORKER_CPUS = (6, 2)


# Placement with selectors from decoupled.ray_runtime.placement, in a driver of its own: the
# node of a one-CPU bundle kept off the nodes in argv[2] (a comma-separated list).
EXCLUDE = """
import logging, sys
import ray
from ray.util.placement_group import placement_group
from decoupled.ray_runtime.placement import bundle_selectors
ray.init(address=sys.argv[1], logging_level=logging.WARNING)
selectors = bundle_selectors(1, sys.argv[2].split(","))
pg = placement_group([{"CPU": 1}], bundle_label_selector=selectors)
ray.get(pg.ready(), timeout=60)
print(ray.util.placement_group_table(pg)["bundles_to_node_id"][0])
"""


@pytest.mark.timeout(120)
def test_bundle_selectors_keep_a_bundle_off_the_excluded_nodes(three_nodes: LocalCluster) -> None:
    ids = [three_nodes.node_id(n) for n in range(3)]
    for allowed in (1, 2):  # twice, so that a lucky default placement cannot pass it
        excluded = ",".join(i for n, i in enumerate(ids) if n != allowed)
        result = subprocess.run(
            [sys.executable, "-c", EXCLUDE, three_nodes.address, excluded],
            env=three_nodes.env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.split() == [ids[allowed]]


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("ray-node-loss")
    with local_cluster(logs, workers=2, worker_cpus=WORKER_CPUS) as cluster:
        yield cluster


@pytest.mark.timeout(300)
def test_losing_a_worker_node_moves_its_stages_and_the_run_finishes(
    three_nodes: LocalCluster, tmp_path: Path
) -> None:
    started = time.monotonic()
    train = [
        str(DIGITS_CONFIG),
        "stages=2",
        f"train.steps={STEPS}",
        f"checkpoint.every={EVERY}",
        f"runtime.address={three_nodes.address}",
        "runtime.timeout_s=60",
        f"runtime.stall_timeout_s={STALL_S}",
        "train.progress=false",
    ]
    with hang_the_large_worker(three_nodes, tmp_path, train, ["ray::StageActor"]) as loss:
        event, out = loss.event, loss.out

        def training_again() -> bool:
            after = run_records(out)
            i = next(i for i, r in enumerate(after) if r.get("event") == "restart")
            return any(r.get("event") == "train" and r["step"] > event["step"] for r in after[i:])

        resumed = loss.noticed + wait_until(
            "training after the restart", training_again, loss.process, 120
        )
        loss.process.wait(timeout=180)
    output = loss.output()
    print(
        f"node hung after the cut at step {loss.sealed}: restart {loss.noticed:.1f}s after the "
        f"freeze, placed again after {loss.placed_at - loss.frozen:.1f}s, "
        f"training again after {resumed:.1f}s; the run took {time.monotonic() - started:.1f}s, "
        f"{time.monotonic() - loss.frozen:.1f}s of it after the freeze"
    )
    assert loss.process.returncode == 0, output[-4000:]
    assert loss.noticed < NOTICE_S, output[-4000:]
    # Placed again long before the GCS could mark the lost node dead, and not on it.
    assert loss.placed_at - (loss.frozen + loss.noticed) < PLACED_S, output[-4000:]
    assert loss.lost_id not in loss.placed_on and loss.placed_on <= loss.alive
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["restarts"] >= 1
    assert event["step"] >= loss.sealed >= EVERY  # from the last sealed cut, not from the start
    assert set(summary["nodes"]) <= loss.alive and loss.lost_id not in summary["nodes"]
    assert {stage["node_id"] for stage in summary["stages"]} <= loss.alive
    assert summary["test_accuracy"] > 0.8
