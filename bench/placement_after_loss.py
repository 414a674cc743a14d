"""How long a new placement group takes after a node is lost, with and without keeping it off
that node (``decoupled/ray_runtime/placement.py``'s label selectors), for a node killed outright
and for one that hung.

A head of one CPU and two workers of 6 and 2 CPUs (separate `ray start` processes on this
machine; the cluster of tests/integration/cluster.py). A driver places two one-CPU bundles
(PACK: both on the 6-CPU worker), the node holding them is SIGKILLed (``kill``: its ports
refuse connections) or SIGSTOPped (``freeze``: the kernel accepts connections, nothing
answers), the group is removed and the same group placed again, with selectors that exclude
the lost node or without. Reported per run: seconds from the removal to the new group being
placed (None: not within ``--wait``), and whether it avoided the lost node.

    PYTHONPATH=. .venv/bin/python bench/placement_after_loss.py --fault freeze --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the test suite's local cluster

from tests.integration.cluster import local_cluster  # noqa: E402

# The second driver: first group, then (once told which node was lost) the second one.
DRIVER = r"""
import json, logging, sys, time
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from decoupled.ray_runtime.placement import bundle_selectors
ray.init(address=sys.argv[1], logging_level=logging.WARNING)
exclude, wait = sys.argv[2] == "1", float(sys.argv[3])
pg = placement_group([{"CPU": 1}] * 2, strategy="PACK")
ray.get(pg.ready(), timeout=60)
print(json.dumps(ray.util.placement_group_table(pg)["bundles_to_node_id"]), flush=True)
lost = sys.stdin.readline().strip()
remove_placement_group(pg)
start = time.monotonic()
selectors = bundle_selectors(2, [lost]) if exclude else None
again = placement_group([{"CPU": 1}] * 2, strategy="PACK", bundle_label_selector=selectors)
ready, _ = ray.wait([again.ready()], timeout=wait)
placed = time.monotonic() - start if ready else None
nodes = ray.util.placement_group_table(again)["bundles_to_node_id"].values() if ready else []
print(json.dumps({"placed_s": placed, "avoided_lost_node": lost not in nodes if ready else None}))
"""


def one_run(fault: str, exclude: bool, wait: float) -> dict[str, object]:
    with (
        tempfile.TemporaryDirectory() as logs,
        local_cluster(Path(logs), workers=2, worker_cpus=(6, 2)) as cluster,
    ):
        ids = [cluster.node_id(n) for n in range(3)]
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, cluster.address, str(int(exclude)), str(wait)],
            env=cluster.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert driver.stdin is not None and driver.stdout is not None
        first = set(json.loads(driver.stdout.readline()).values())
        assert len(first) == 1, f"the first group was spread over {first}"
        lost = ids.index(first.pop())
        if fault == "kill":
            cluster.kill_node(lost)
        else:
            for pid in cluster.processes(lost):
                os.kill(pid, signal.SIGSTOP)
        driver.stdin.write(ids[lost] + "\n")
        driver.stdin.flush()
        result: dict[str, object] = json.loads(driver.stdout.readline())
        driver.wait(timeout=60)
        cluster.kill_node(lost)  # a stopped node for good: its stop would wait on it
        return {"fault": fault, "exclude": exclude, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=["kill", "freeze"], default="freeze")
    parser.add_argument("--runs", type=int, default=1, help="runs of each: with and without")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds for the new group")
    args = parser.parse_args()
    print(json.dumps({"machine": machine()}))
    for _ in range(args.runs):
        for exclude in (True, False):
            print(json.dumps(one_run(args.fault, exclude, args.wait)), flush=True)


if __name__ == "__main__":
    main()
