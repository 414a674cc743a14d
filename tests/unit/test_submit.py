"""`decoupled submit` without a cluster: what it checks before submitting, what it would submit.

The submission itself, against a real two-node cluster, is tests/integration/test_submit.py.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest

from decoupled.cli import main
from decoupled.ray_runtime.submit import (
    EXCLUDES,
    SubmitError,
    exit_code,
    job_env,
    masked,
    pinned_packages,
)
from tests.conftest import ROOT

# Nothing listens there: a check that fails before submitting must not need a cluster.
NOWHERE = ["--address", "http://127.0.0.1:9", "--working-dir", str(ROOT)]


def _dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[str], dict[str, object]]:
    assert main(["submit", *args, *NOWHERE, "--dry-run"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    return argv, runtime_env


def test_dry_run_is_the_ray_job_submit_command(capsys: pytest.CaptureFixture[str]) -> None:
    argv, runtime_env = _dry_run(
        capsys, "configs/digits.yaml", "stages=2", "method.name=dni", "--out", "/shared/runs/a"
    )
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:9"
    assert argv[argv.index("--submission-id") + 1].startswith("decoupled-dni-")
    command = argv[argv.index("--") + 1 :]
    assert command == [
        *("python", "-m", "decoupled.cli", "train", "configs/digits.yaml"),
        *("train.progress=false", "stages=2", "method.name=dni", "runtime.address=auto"),
        *("--out", "/shared/runs/a"),
    ]
    assert runtime_env["working_dir"] == str(ROOT)
    assert runtime_env["excludes"] == EXCLUDES
    assert {"/.venv/", "/runs/", "/data/", "/.git/"} <= set(EXCLUDES)
    assert "pip" not in runtime_env  # the image has the dependencies


def test_overwrite_travels_to_the_job(capsys: pytest.CaptureFixture[str]) -> None:
    # Without it the job's `train` refuses an --out that holds a run (exit 2, which submit
    # passes on); with it the job deletes that run first.
    argv, _ = _dry_run(capsys, "configs/digits.yaml", "--out", "/shared/runs/a", "--overwrite")
    assert argv[-3:] == ["--out", "/shared/runs/a", "--overwrite"]


def test_the_config_path_is_given_relative_to_the_working_dir(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv, _ = _dry_run(capsys, str(ROOT / "configs" / "digits.yaml"))
    assert argv[argv.index("train") + 1] == "configs/digits.yaml"


def test_pip_pins_the_projects_dependencies_but_not_ray(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, runtime_env = _dry_run(capsys, "configs/digits.yaml", "--pip")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(d for d in dependencies if d.startswith("torch=="))
    assert runtime_env["pip"] == {
        "packages": pinned_packages(ROOT / "pyproject.toml"),
        "pip_check": False,
    }
    assert torch in pinned_packages(ROOT / "pyproject.toml")
    assert not [p for p in pinned_packages(ROOT / "pyproject.toml") if p.startswith("ray")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["configs/digits.yaml", "stages=x"], "stages: expected an integer"),
        (["configs/nope.yaml"], "no such config file"),
        # configs/mnist_fcn4.yaml reads data/, which the job never receives
        (["configs/mnist_fcn4.yaml"], "data.root: 'data' is relative"),
        (["configs/digits.yaml", "--out", "runs/x"], "--out runs/x: a path on the head node"),
        (["configs/digits.yaml", "--env", "RAY_AUTH_TOKEN=x"], "Ray's credentials stay"),
        (["configs/digits.yaml", "--env", "NOVALUE"], "expected KEY=VALUE"),
        (["configs/digits.yaml", "--overwrite"], "--overwrite needs --out"),
    ],
)
def test_a_bad_submission_exits_2_before_contacting_the_cluster(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", *args, *NOWHERE]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_an_unreachable_cluster_fails_the_submit_with_a_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["submit", "configs/digits.yaml", *NOWHERE]) == 1
    err = capsys.readouterr().err
    assert "could not submit the job" in err and "Traceback" not in err


def test_a_config_outside_the_working_dir_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = shutil.copy(ROOT / "configs" / "digits.yaml", tmp_path / "mine.yaml")
    assert main(["submit", str(config), *NOWHERE]) == 2
    assert "not inside the working directory" in capsys.readouterr().err


def test_data_on_shared_storage_or_downloaded_is_accepted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _dry_run(capsys, "configs/mnist_fcn4.yaml", "data.root=/shared/mnist")
    _dry_run(capsys, "configs/mnist_fcn4.yaml", "data.download=true")


def test_job_env_passes_wandb_and_nccl_but_never_ray_credentials() -> None:
    environ = {
        "WANDB_API_KEY": "secret",
        "WANDB_PROJECT": "dni",
        "NCCL_DEBUG": "INFO",
        "NCCL_SOCKET_IFNAME": "eth0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": "t0ken",
        "HOME": "/root",
    }
    env = job_env(environ, ["GLOO_SOCKET_IFNAME=eth0", "NCCL_DEBUG=WARN"])
    assert env == {
        "WANDB_API_KEY": "secret",
        "WANDB_PROJECT": "dni",
        "NCCL_DEBUG": "WARN",  # --env wins over the environment
        "NCCL_SOCKET_IFNAME": "eth0",
        "GLOO_SOCKET_IFNAME": "eth0",
    }
    with pytest.raises(SubmitError):
        job_env({}, ["RAY_AUTH_MODE=token"])
    shown = masked({"working_dir": "/w", "env_vars": env})
    assert shown["env_vars"]["WANDB_API_KEY"] == "***"
    assert shown["env_vars"]["NCCL_DEBUG"] == "WARN"
    assert env["WANDB_API_KEY"] == "secret"  # masking copies


@pytest.mark.parametrize(
    ("status", "driver_exit_code", "expected"),
    [
        ("SUCCEEDED", 0, 0),
        ("FAILED", 1, 1),
        ("FAILED", 2, 2),  # bad config or missing data where the job ran
        ("FAILED", None, 1),  # e.g. the runtime environment could not be set up
        ("STOPPED", 143, 143),  # `ray job stop`: SIGTERM, as `train` reports it
        ("STOPPED", None, 143),
    ],
)
def test_exit_code_follows_the_jobs_final_status(
    status: str, driver_exit_code: int | None, expected: int
) -> None:
    assert exit_code(status, driver_exit_code) == expected
