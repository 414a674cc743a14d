"""The CLI contract: outputs in --out, exit codes, and clear messages for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from decoupled import run_folder
from decoupled.cli import main
from decoupled.config import config_to_dict, load_config
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


def _train(out: Path, *overrides: str, flags: tuple[str, ...] = ()) -> int:
    return main(["train", str(DIGITS_CONFIG), *SHORT, *overrides, "--out", str(out), *flags])


def test_a_folder_holding_a_run_is_refused_and_overwrite_replaces_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a"
    assert _train(out, "train.steps=20", "checkpoint.every=10") == 0
    summary = (out / "summary.json").read_text()
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert _train(out, "train.steps=10") == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a run" in err
    assert "metrics.jsonl" in err and "summary.json" in err
    assert "checkpoints/ (cuts at steps 10, 20)" in err
    assert f"--resume {out}" in err and "new --out" in err and "--overwrite" in err
    assert "Traceback" not in err
    # Nothing of the first run was touched.
    assert (out / "summary.json").read_text() == summary
    assert (out / "metrics.jsonl").read_text() == metrics

    (out / "notes.txt").write_text("mine")
    assert _train(out, "train.steps=10", "checkpoint.every=10", flags=("--overwrite",)) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000010"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 10  # the old run's records are gone, not appended to
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the run's stay


def test_overwrite_with_resume_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a"
    assert _train(out, flags=("--resume", "--overwrite")) == 2
    assert "--resume" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_with_only_a_config_is_not_a_run(tmp_path: Path) -> None:
    # What a run that stopped before its first step (missing data, no cluster) leaves behind.
    out = tmp_path / "a"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "checkpoints").mkdir()
    assert _train(out, "train.steps=5") == 0


def test_default_run_folders_never_collide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    # Two runs in the same second: the clock is pinned so that they are.
    monkeypatch.setattr(time, "strftime", lambda _: "20260101-000000")
    for _ in range(2):
        assert main(["train", str(DIGITS_CONFIG), *SHORT, "train.steps=5"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["20260101-000000-cdni-k3", "20260101-000000-cdni-k3-2"]
    assert all((tmp_path / "runs" / name / "summary.json").is_file() for name in runs)
    assert capsys.readouterr().out.count("run folder: runs/20260101-000000-cdni-k3") == 2


def test_default_folders_made_at_once_from_threads_are_all_distinct(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: run_folder.new_default(tmp_path, "dni", 2), range(32)))
    assert len(set(made)) == 32 and all(p.is_dir() for p in made)


def test_version_and_a_help_without_markup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == "decoupled 0.1.0"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "--print-config" in text and "exit codes" in text


def test_print_config_shows_every_key_its_default_and_meaning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "train",
            str(DIGITS_CONFIG),
            "optim.lr=0.01",
            "--print-config",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    assert not (tmp_path / "run").exists()  # nothing trained, no folder made
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed == config_to_dict(load_config(DIGITS_CONFIG, ["optim.lr=0.01"]))
    lines = {line.split(":")[0].strip(): line for line in text.splitlines()}
    assert "default 0.001" in lines["lr"]  # differs from its default: the default is shown
    assert "one of backprop, pipeline, dni, cdni" in text  # method.name's allowed values
    assert "Train the synthesizer on the target of every n-th step" in lines["train_every"]
