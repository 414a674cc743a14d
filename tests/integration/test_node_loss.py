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
from typing import Any

import pytest

from decoupled.checkpoint import complete_steps
from tests.conftest import DIGITS_CONFIG
from tests.integration.cluster import (
    BIN,
    LocalCluster,
    PlacementWatch,
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
    cluster, out = three_nodes, tmp_path / "run"
    watch = PlacementWatch(cluster, tmp_path / "placements.jsonl")
    started = time.monotonic()
    with open(tmp_path / "train.log", "wb") as log:
        process = subprocess.Popen(
            [
                str(BIN / "decoupled"),
                "train",
                str(DIGITS_CONFIG),
                "stages=2",
                f"train.steps={STEPS}",
                f"checkpoint.every={EVERY}",
                f"runtime.address={cluster.address}",
                "runtime.timeout_s=60",
                f"runtime.stall_timeout_s={STALL_S}",
                "train.progress=false",
                "--out",
                str(out),
            ],
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        checkpoints = out / "checkpoints"
        wait_until("sealed cut", lambda: bool(complete_steps(checkpoints)), process, 120)
        # Ray packs both one-CPU bundles on the node with the most room.
        hosting = [n for n in (0, 1, 2) if cluster.hosts(n, "ray::StageActor")]
        assert hosting == [1], f"the stages are on nodes {hosting}, not both on the large worker"
        lost, kept = 1, 2
        lost_id, alive = cluster.node_id(lost), {cluster.node_id(0), cluster.node_id(kept)}
        sealed = complete_steps(checkpoints)[-1]
        cluster.freeze_node(lost)
        frozen = time.monotonic()

        def restart() -> dict[str, Any] | None:
            return next((r for r in run_records(out) if r.get("event") == "restart"), None)

        noticed = wait_until("restart", lambda: restart() is not None, process, 120)
        event = restart()
        assert event is not None
        noticed_at = frozen + noticed

        def placed_again() -> list[tuple[float, set[str]]]:
            return sorted(p for p in watch.placed().values() if p[0] > frozen)

        wait_until("placement after the restart", lambda: bool(placed_again()), process, 120)
        placed_at, placed_on = placed_again()[0]
        placed = placed_at - frozen

        def training_again() -> bool:
            after = run_records(out)
            i = next(i for i, r in enumerate(after) if r.get("event") == "restart")
            return any(r.get("event") == "train" and r["step"] > event["step"] for r in after[i:])

        resumed = noticed + wait_until("training after the restart", training_again, process, 120)
        process.wait(timeout=180)
    finally:
        watch.close()
        cluster.kill_node(1)  # the hung node, for good (the fixture's stop would wait for it)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    output = (tmp_path / "train.log").read_text(errors="replace")
    print(
        f"node hung after the cut at step {sealed}: restart {noticed:.1f}s after the freeze, "
        f"placed again after {placed:.1f}s, "
        f"training again after {resumed:.1f}s; the run took {time.monotonic() - started:.1f}s, "
        f"{time.monotonic() - frozen:.1f}s of it after the freeze"
    )
    assert process.returncode == 0, output[-4000:]
    assert noticed < NOTICE_S, output[-4000:]
    # Placed again long before the GCS could mark the lost node dead, and not on it.
    assert placed_at - noticed_at < PLACED_S, output[-4000:]
    assert lost_id not in placed_on and placed_on <= alive
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["restarts"] >= 1
    assert event["step"] >= sealed >= EVERY  # from the last sealed cut, not from the start
    assert set(summary["nodes"]) <= alive and lost_id not in summary["nodes"]
    assert {stage["node_id"] for stage in summary["stages"]} <= alive
    assert summary["test_accuracy"] > 0.8
