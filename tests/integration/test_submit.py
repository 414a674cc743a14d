"""`decoupled submit` against a real two-node cluster on this machine (head with the dashboard's
job server, one worker, one CPU each): the job goes through `ray job submit`, runs
`decoupled train` on the head with the repository as its working directory, and puts one stage
on each node. Its exit code follows the job's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DIGITS_CONFIG, ROOT
from tests.integration.cluster import BIN, LocalCluster

pytestmark = pytest.mark.integration


def _submit(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    assert cluster.dashboard is not None
    return subprocess.run(
        [str(BIN / "decoupled"), "submit", *args, "--address", cluster.dashboard],
        cwd=ROOT,  # the working directory shipped to the cluster: the repository
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.timeout(300)
def test_submitted_job_runs_stages_on_both_nodes(two_nodes: LocalCluster, tmp_path: Path) -> None:
    out = tmp_path / "run"  # the job runs on this machine, so its --out can be read here
    config = DIGITS_CONFIG.relative_to(ROOT)
    result = _submit(
        two_nodes,
        str(config),
        "stages=2",
        "train.steps=60",
        "runtime.timeout_s=120",
        "--out",
        str(out),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60
    assert len(summary["nodes"]) == 2
    assert len({stage["node_id"] for stage in summary["stages"]}) == 2
    assert summary["test_accuracy"] > 0.5


@pytest.mark.timeout(180)
def test_a_job_that_fails_on_the_cluster_fails_the_submit(
    two_nodes: LocalCluster, tmp_path: Path
) -> None:
    # Valid here, but the data is missing where the job runs: `train` exits 2 on the head, and so
    # does `submit`.
    missing = tmp_path / "no-mnist-here"
    result = _submit(
        two_nodes, "configs/digits.yaml", "data.name=mnist", f"data.root={missing}", "stages=2"
    )
    assert result.returncode == 2, (result.stdout + result.stderr)[-4000:]
    assert "failed, exit code 2" in result.stderr
    assert "train-images-idx3-ubyte" in result.stdout + result.stderr  # the job's own message
