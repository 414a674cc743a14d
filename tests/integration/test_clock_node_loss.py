"""Losing the worker node that holds both cores of the two-timescale system (section 3.2): the
cores move to the nodes left and the run finishes.

The set-up of ``test_node_loss.py`` (whose docstring says why a hung node is the case that
tells the exclusion apart): a head of one CPU and workers of 6 and 2 CPUs; the two one-CPU
cores are packed on the larger worker; once a cut is sealed, every process of that node is
stopped (SIGSTOP). The driver must notice (a poll unanswered for ``runtime.stall_timeout_s``),
keep the silent node out of its next placement group, place both cores on the smaller worker
within ``PLACED_S`` (long before the GCS marks the hung node dead, which left a group placed
there waiting for more than 120 s in the feed-forward test's measurement) and finish from the cut.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from decoupled.checkpoint import complete_steps
from tests.integration.cluster import (
    BIN,
    LocalCluster,
    PlacementWatch,
    local_cluster,
    run_records,
    wait_until,
)

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "copy_twotimescale.yaml"
TICKS = 600
EVERY = 50
STALL_S = 10
NOTICE_S = STALL_S + 15.0
PLACED_S = 3.0
WORKER_CPUS = (6, 2)  # the lost node still shows the most free CPUs after the loss


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("ray-clock-node-loss")
    with local_cluster(logs, workers=2, worker_cpus=WORKER_CPUS) as cluster:
        yield cluster


@pytest.mark.timeout(300)
def test_losing_the_node_of_both_cores_moves_them_and_the_run_finishes(
    three_nodes: LocalCluster, tmp_path: Path
) -> None:
    cluster, out = three_nodes, tmp_path / "run"
    watch = PlacementWatch(cluster, tmp_path / "placements.jsonl")
    with open(tmp_path / "train.log", "wb") as log:
        process = subprocess.Popen(
            [
                str(BIN / "decoupled"),
                "train",
                str(CONFIG),
                "method.name=backprop",  # lockstep: the fast core's gradient every tick
                f"train.steps={TICKS}",
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
        hosting = [
            n
            for n in (0, 1, 2)
            if cluster.hosts(n, "ray::SlowActor") or cluster.hosts(n, "ray::FastActor")
        ]
        assert hosting == [1], f"the cores are on nodes {hosting}, not both on the large worker"
        lost_id = cluster.node_id(1)
        alive = {cluster.node_id(0), cluster.node_id(2)}
        sealed = complete_steps(checkpoints)[-1]
        cluster.freeze_node(1)
        frozen = time.monotonic()

        def restart() -> dict[str, Any] | None:
            return next((r for r in run_records(out) if r.get("event") == "restart"), None)

        noticed = wait_until("restart", lambda: restart() is not None, process, 120)
        event = restart()
        assert event is not None

        def placed_again() -> list[tuple[float, set[str]]]:
            return sorted(p for p in watch.placed().values() if p[0] > frozen)

        wait_until("placement after the restart", lambda: bool(placed_again()), process, 120)
        placed_at, placed_on = placed_again()[0]
        process.wait(timeout=180)
    finally:
        watch.close()
        cluster.kill_node(1)  # the hung node, for good (the fixture's stop would wait for it)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    output = (tmp_path / "train.log").read_text(errors="replace")
    assert process.returncode == 0, output[-4000:]
    assert noticed < NOTICE_S, output[-4000:]
    assert placed_at - (frozen + noticed) < PLACED_S, output[-4000:]
    assert lost_id not in placed_on and placed_on <= alive
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == TICKS
    assert summary["restarts"] >= 1
    assert event["step"] >= sealed >= EVERY  # from the last sealed cut, not from the start
    assert summary["nodes"] == [cluster.node_id(2)]  # both cores on the worker left
    assert summary["accuracy"] > 0.5  # it learned on (chance: 0.25)
