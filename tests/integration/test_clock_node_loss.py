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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cluster import (
    LocalCluster,
    hang_the_large_worker,
    local_cluster,
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
    train = [
        str(CONFIG),
        "method.name=backprop",  # lockstep: the fast core's gradient every tick
        f"train.steps={TICKS}",
        f"checkpoint.every={EVERY}",
        f"runtime.address={three_nodes.address}",
        "runtime.timeout_s=60",
        f"runtime.stall_timeout_s={STALL_S}",
        "train.progress=false",
    ]
    titles = ["ray::SlowActor", "ray::FastActor"]
    with hang_the_large_worker(three_nodes, tmp_path, train, titles) as loss:
        loss.process.wait(timeout=180)
    output = loss.output()
    assert loss.process.returncode == 0, output[-4000:]
    assert loss.noticed < NOTICE_S, output[-4000:]
    assert loss.placed_at - (loss.frozen + loss.noticed) < PLACED_S, output[-4000:]
    assert loss.lost_id not in loss.placed_on and loss.placed_on <= loss.alive
    summary = json.loads((loss.out / "summary.json").read_text())
    assert summary["steps"] == TICKS
    assert summary["restarts"] >= 1
    assert loss.event["step"] >= loss.sealed >= EVERY  # from the last sealed cut, not the start
    assert summary["nodes"] == [three_nodes.node_id(2)]  # both cores on the worker left
    assert summary["accuracy"] > 0.5  # it learned on (chance: 0.25)
