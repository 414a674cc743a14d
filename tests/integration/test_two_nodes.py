"""A real two-node Ray cluster on this machine (the `two_nodes` fixture): head and worker as
separate `ray start` processes with one CPU each, so a two-stage job must put one stage on each
node."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import DIGITS_CONFIG
from tests.integration.cluster import BIN, LocalCluster

pytestmark = pytest.mark.integration


USER_MODEL = """
from torch import nn


def blocks(cfg, input_shape, num_classes):
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU()),
        nn.Sequential(nn.Linear(128, 128), nn.ReLU()),
        nn.Linear(128, num_classes),
    ]
"""


@pytest.mark.timeout(300)
def test_job_places_stages_on_both_nodes(two_nodes: LocalCluster, tmp_path: Path) -> None:
    """The model is the user's, in a file outside the package that only the driver can import:
    Ray ships it to the actors on both nodes."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "my_model.py").write_text(USER_MODEL)
    out = tmp_path / "run"
    env = two_nodes.env | {"PYTHONPATH": f"{code}:{two_nodes.env.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [
            str(BIN / "decoupled"),
            "train",
            str(DIGITS_CONFIG),
            "stages=2",
            "train.steps=60",
            "model.name=my_model:blocks",
            f"runtime.address={two_nodes.address}",
            "runtime.timeout_s=120",
            "train.progress=false",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60
    assert len(summary["nodes"]) == 2
    assert len({stage["node_id"] for stage in summary["stages"]}) == 2
    assert summary["test_accuracy"] > 0.5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("token", ["0" * 64, None])
def test_a_cluster_that_refuses_the_token_fails_fast_with_one_line(
    two_nodes: LocalCluster, tmp_path: Path, token: str | None
) -> None:
    env = {k: v for k, v in two_nodes.env.items() if not k.startswith("RAY_AUTH_")}
    if token is not None:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    started = time.monotonic()
    result = subprocess.run(
        [
            str(BIN / "decoupled"),
            "train",
            str(DIGITS_CONFIG),
            f"runtime.address={two_nodes.address}",
            "runtime.timeout_s=10",
            "--out",
            str(tmp_path / "run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    # Ray alone retried for 20 s with a warning a second; the margin is imports on a shared box.
    assert elapsed < 10 + 20, elapsed
    (line,) = result.stderr.strip().splitlines()
    assert f"the Ray cluster at {two_nodes.address}" in line
    assert "refused this client's token" in line and "RAY_AUTH_TOKEN" in line
