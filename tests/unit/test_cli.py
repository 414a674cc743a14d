"""The CLI contract: outputs in --out, exit codes, and clear messages for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from decoupled.cli import main
from tests.conftest import DIGITS_CONFIG

SHORT = ["train.steps=30", "train.progress=false", "runtime.backend=local"]


def test_train_writes_config_metrics_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", str(DIGITS_CONFIG), *SHORT, "method.name=cdni", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "method",
        "stages",
        "steps",
        "wall_s",
        "samples_per_s",
        "train_loss",
        "test_accuracy",
    ):
        assert summary[key] is not None, key
    assert summary["method"] == "cdni" and summary["steps"] == 30
    assert [s["index"] for s in summary["stages"]] == [0, 1, 2]
    for key in (
        "busy_fraction",
        "input_wait_s",
        "sg_loss",
        "sg_cosine",
        "staleness_mean",
        "targets_dropped",
    ):
        assert key in summary["stages"][0]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 30 and resolved["method"]["name"] == "cdni"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] >= 1 for line in lines)
    assert "test accuracy" in capsys.readouterr().out


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "decoupled.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("optim:\n  lrr: 0.1\n", ["optim.lrr", "'lr'"]),
        ("data:\n  batch_size: lots\n", ["data.batch_size", "integer"]),
        ("data:\n  batch_size: 0\n", ["data.batch_size", "1"]),
        ("method:\n  name: magic\n", ["method.name", "backprop", "cdni"]),
        ("data: [unclosed\n", ["bad.yaml:"]),
    ],
)
def test_bad_config_exits_2_naming_the_key_without_traceback(
    tmp_path: Path, yaml_text: str, expected: list[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    result = _run_cli("train", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in result.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_bad_override_exits_2(tmp_path: Path) -> None:
    result = _run_cli("train", str(DIGITS_CONFIG), "stages=0", "optim.momentun=0.5", cwd=tmp_path)
    assert result.returncode == 2
    assert "stages" in result.stderr and "optim.momentun" in result.stderr  # both, at once
    assert "Traceback" not in result.stderr


def test_missing_data_file_exits_2_naming_the_file(tmp_path: Path) -> None:
    result = _run_cli(
        "train",
        str(DIGITS_CONFIG),
        "data.name=mnist",
        f"data.root={tmp_path}",
        "runtime.backend=local",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "train-images-idx3-ubyte" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    assert _run_cli("train", cwd=tmp_path).returncode == 2
    assert _run_cli("fly", "x.yaml", cwd=tmp_path).returncode == 2


def test_non_finite_loss_stops_the_run_with_exit_1(tmp_path: Path) -> None:
    result = _run_cli(
        "train",
        str(DIGITS_CONFIG),
        *SHORT,
        "optim.name=sgd",
        "optim.lr=1e30",
        "method.name=backprop",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "non-finite" in result.stderr and "Traceback" not in result.stderr
