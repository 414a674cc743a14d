"""``decoupled submit CONFIG [KEY=VALUE ...]``: run ``decoupled train`` on a Ray cluster as a job.

It does what ``ray job submit`` does, through the same job SDK (``--dry-run`` prints the equivalent
``ray job submit`` command), and adds what that command lacks here: the config is checked first
(exit 2 on a bad one, as ``train`` does); the repository is shipped as the job's working directory
with WANDB_* and NCCL_* passed on; a head that is still starting its job agent is waited for; and
the exit code follows the job's final status (``ray job submit`` exits 0 on a stopped job and 1 on
any failure). The job runs ``python -m decoupled.cli train CONFIG ... runtime.address=auto`` on
the head node; the logs stream here until it ends.

The cluster's nodes must already have the pinned dependencies (torch, Ray): the images in
``docker/`` and the launch files in ``launch/`` give them. ``--pip`` asks Ray to install them per
job instead, for a cluster that runs a stock Ray image.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from decoupled.config import Config, ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_STOPPED = 0, 1, 2, 130, 143

# Never uploaded: environments, run outputs, data (it lives on shared storage), caches, history.
# Anchored at the working directory's root where the name is a top-level folder of this repo.
EXCLUDES = [
    "/.venv/",
    "/runs/",
    "/data/",
    "/.git/",
    "/wandb/",
    "__pycache__/",
    "*.egg-info/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".hypothesis/",
]
# A relative data.root starting with one of these points into a folder the job never receives.
_EXCLUDED_TOP = {"data", "runs", ".venv", ".git", "wandb"}
# Passed on from the submitter's environment into every process of the job.
ENV_PREFIXES = ("WANDB_", "NCCL_")
# Client credentials: the nodes are started with their own, and a job's runtime environment is
# stored with the job for anyone who can list jobs to read.
_CLIENT_ONLY = ("RAY_AUTH_",)
_SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
POLL_S = 2.0
AGENT_WAIT_S = 60.0  # how long a fresh head may take to accept jobs


def add_parser(commands: Any) -> None:
    """Add ``submit`` to the CLI's subcommands (``commands`` is argparse's subparsers action)."""
    p = commands.add_parser(
        "submit",
        help="run `decoupled train` on a Ray cluster as a job (wraps `ray job submit`)",
    )
    p.add_argument("config", type=Path, help="YAML experiment inside the working directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="as for `train`")
    p.add_argument(
        "--address",
        help="the cluster's dashboard, e.g. http://HEAD:8265 (default: as `ray job submit`: "
        "RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else the local cluster)",
    )
    p.add_argument(
        "--out",
        help="run folder on the head node: an absolute path, on shared storage to read it "
        "elsewhere (default: inside the job's temporary copy of the working directory)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="as for `train`: --out may hold an earlier run, whose files are deleted first "
        "(without this, the job refuses such a folder and exits with 2)",
    )
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    p.add_argument(
        "--working-dir",
        type=Path,
        help="folder shipped to the cluster as the job's working directory (default: .)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra environment variable for the job (WANDB_* and NCCL_* pass on by themselves)",
    )
    p.add_argument(
        "--pip",
        action="store_true",
        help="have Ray install pyproject.toml's pinned dependencies for the job (for nodes "
        "without the project's image; slow: a virtualenv per node)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the `ray job submit` command and stop"
    )


class SubmitError(Exception):
    """A problem with the submission's arguments (exit 2)."""


def job_env(environ: Mapping[str, str], extra: Sequence[str] = ()) -> dict[str, str]:
    """The environment variables the job gets: WANDB_*, NCCL_* from ``environ``, then ``extra``."""
    env = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES)}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE")
        if key.startswith(_CLIENT_ONLY):
            raise SubmitError(
                f"--env {key}: Ray's credentials stay with the client; the cluster's nodes are "
                "started with their own"
            )
        env[key] = value
    return env


def pinned_packages(pyproject: Path) -> list[str]:
    """``[project].dependencies`` of ``pyproject``, less Ray (the cluster's Ray is what it is)."""
    try:
        deps: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise SubmitError(f"--pip: cannot read dependencies from {pyproject}: {err}") from None
    return [d for d in deps if re.split(r"[\[=<>!~;\s]", d, maxsplit=1)[0] != "ray"]


def build_runtime_env(
    working_dir: Path, env_vars: Mapping[str, str], pip: Sequence[str] = ()
) -> dict[str, Any]:
    """The job's runtime environment: the working directory, its excludes, env vars, pip."""
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(EXCLUDES),
    }
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if pip:
        runtime_env["pip"] = {"packages": list(pip), "pip_check": False}
    return runtime_env


def entrypoint(
    config: str, overrides: Sequence[str], out: str | None, overwrite: bool = False
) -> list[str]:
    """The command the job runs on the head node.

    ``python -m`` rather than the ``decoupled`` script: the job's working directory comes first
    on ``sys.path``, so the shipped code is what runs, and only ``python`` must be on the head's
    PATH (the image's, or the virtualenv the head was started from). The progress bar is off
    (job logs are not a terminal) unless an override turns it back on; ``runtime.address=auto``
    comes last so that the job joins the cluster it runs on.
    """
    command = ["python", "-m", "decoupled.cli", "train", config, "train.progress=false"]
    command += [*overrides, "runtime.address=auto"]
    return command + (["--out", out] if out else []) + (["--overwrite"] if overwrite else [])


def check_config(config: Path, overrides: Sequence[str], working_dir: Path) -> tuple[Config, str]:
    """Validate locally, as the job will see it; return the config and its path in the job."""
    cfg = load_config(config, [*overrides, "runtime.address=auto"])
    try:
        relative = config.resolve().relative_to(working_dir)
    except ValueError:
        raise SubmitError(
            f"{config} is not inside the working directory {working_dir} that is shipped to "
            "the cluster: move it there or pass --working-dir"
        ) from None
    root = Path(cfg.data.root)
    if (
        cfg.data.name != "digits"
        and not cfg.data.download
        and not root.is_absolute()
        and root.parts[:1]
        and root.parts[0] in _EXCLUDED_TOP
    ):
        raise SubmitError(
            f"data.root: {cfg.data.root!r} is relative, so on the cluster it points into the "
            f"job's copy of the working directory, which leaves {root.parts[0]}/ out: pass "
            "data.root=/an/absolute/path that every node can read (shared storage)"
        )
    return cfg, relative.as_posix()


def submit_command(
    address: str | None,
    submission_id: str,
    runtime_env_json: str,
    command: Sequence[str],
    no_wait: bool,
) -> list[str]:
    """The `ray job submit` command line that does what ``run`` does (for --dry-run)."""
    argv = ["ray", "job", "submit", "--submission-id", submission_id]
    if address:
        argv += ["--address", address]
    argv += ["--runtime-env-json", runtime_env_json]
    if no_wait:
        argv.append("--no-wait")
    return [*argv, "--", *command]


def masked(runtime_env: Mapping[str, Any]) -> dict[str, Any]:
    """``runtime_env`` with secret-looking env values replaced, for printing."""
    shown = dict(runtime_env)
    if "env_vars" in shown:
        shown["env_vars"] = {
            k: "***" if any(m in k.upper() for m in _SECRET_MARKERS) else v
            for k, v in shown["env_vars"].items()
        }
    return shown


@contextlib.contextmanager
def _api_server(address: str | None) -> Iterator[None]:
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; an explicit
    # --address must win here.
    if not address:
        yield
        return
    key = "RAY_API_SERVER_ADDRESS"
    before = os.environ.get(key)
    os.environ[key] = address
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def exit_code(status: str, driver_exit_code: int | None) -> int:
    """``train``'s exit codes, from the job's final status."""
    if status == "SUCCEEDED":
        return EXIT_OK
    if status == "STOPPED":  # `ray job stop` sends SIGTERM: `train` checkpoints and stops
        return EXIT_STOPPED
    # A bad config or missing data on the cluster's side is still a usage error.
    return EXIT_USAGE if driver_exit_code == EXIT_USAGE else EXIT_FAILED


class Job:
    """One submission through Ray's job SDK (what `ray job submit` itself calls)."""

    def __init__(self, address: str | None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(address)
        # Ray's SDK logs every file it leaves out of the upload, at each try, and every closed
        # log stream (its loggers set INFO on import): keep their warnings only.
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def submit(self, submission_id: str, command: Sequence[str], runtime_env: Any) -> None:
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                self.client.submit_job(
                    entrypoint=shlex.join(command),
                    submission_id=submission_id,
                    runtime_env=runtime_env,
                )
                return
            except RuntimeError as err:
                # A head that has just started answers before its job agent is up (Ray itself
                # waits 10 s for it); `make cluster-up && make submit` meets that window.
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(POLL_S)

    def follow(self, submission_id: str) -> None:
        """Print the job's logs until it ends (or the stream breaks)."""

        async def tail() -> None:
            async for lines in self.client.tail_job_logs(submission_id):
                print(lines, end="", flush=True)

        try:
            asyncio.run(tail())
        except Exception as err:  # the stream broke; the job may well go on: its status decides
            print(f"decoupled: the log stream ended early ({err!r})", file=sys.stderr)

    def final_status(self, submission_id: str) -> tuple[str, int | None]:
        """Wait for the job to end; return its status and its entrypoint's exit code."""
        while True:
            info = self.client.get_job_info(submission_id)
            status = str(getattr(info.status, "value", info.status))
            if status in _TERMINAL:
                return status, info.driver_exit_code
            time.sleep(POLL_S)


def _fail(message: str, code: int) -> int:
    print(f"decoupled: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """``decoupled submit``; returns the exit code."""
    environ = os.environ if environ is None else environ
    working_dir = (args.working_dir or Path.cwd()).resolve()
    try:
        if not working_dir.is_dir():
            raise SubmitError(f"--working-dir {working_dir}: no such folder")
        cfg, config = check_config(args.config, args.overrides, working_dir)
        if args.overwrite and not args.out:
            raise SubmitError("--overwrite needs --out: without it the job has a new folder")
        if args.out and not Path(args.out).is_absolute():
            raise SubmitError(
                f"--out {args.out}: a path on the head node must be absolute (a relative one "
                "lands in the job's temporary copy of the working directory)"
            )
        env_vars = job_env(environ, args.env)
        pip = pinned_packages(working_dir / "pyproject.toml") if args.pip else []
    except ConfigError as err:
        return _fail(f"bad configuration\n{err}", EXIT_USAGE)
    except SubmitError as err:
        return _fail(str(err), EXIT_USAGE)

    runtime_env = build_runtime_env(working_dir, env_vars, pip)
    command = entrypoint(config, args.overrides, args.out, args.overwrite)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    submission_id = f"decoupled-{cfg.method.name}-{stamp}-{secrets.token_hex(3)}"
    if args.dry_run:
        shown = json.dumps(masked(runtime_env))
        print(shlex.join(submit_command(args.address, submission_id, shown, command, args.no_wait)))
        return EXIT_OK

    with _api_server(args.address):
        try:
            job = Job(args.address)
            job.submit(submission_id, command, runtime_env)
        except (OSError, RuntimeError, ValueError) as err:  # unreachable, refused, rejected
            return _fail(f"could not submit the job: {err}", EXIT_FAILED)
        print(f"decoupled: submitted job {submission_id}: {shlex.join(command)}", file=sys.stderr)
        if not args.out:
            print(
                "decoupled: no --out: the run folder stays in the job's working directory on "
                "the head node (the summary is in the job's logs)",
                file=sys.stderr,
            )
        if args.no_wait:
            print(f"decoupled: {_follow_hint(submission_id)}", file=sys.stderr)
            return EXIT_OK
        try:
            job.follow(submission_id)
            status, driver_code = job.final_status(submission_id)
        except KeyboardInterrupt:
            return _fail(
                f"interrupted; the job goes on: {_follow_hint(submission_id)}", EXIT_INTERRUPTED
            )
        except (OSError, RuntimeError) as err:  # the head went away, or its job server did
            return _fail(
                f"lost the job server while following job {submission_id}: {err} "
                f"(`ray job status {submission_id}` may know more)",
                EXIT_FAILED,
            )
    code = exit_code(status, driver_code)
    detail = f", exit code {driver_code}" if driver_code not in (None, 0) else ""
    print(f"decoupled: job {submission_id} {status.lower()}{detail}", file=sys.stderr)
    return code


def _follow_hint(submission_id: str) -> str:
    return f"`ray job logs -f {submission_id}` follows it, `ray job stop {submission_id}` stops it"
