"""The launch files (launch/, docker/, the Makefile's targets) against what a mistake would break.

Nothing here starts a container or a cloud machine (no Docker engine or cloud runs on the test
machines): each file is parsed, validated against its real schema where one is at hand (Ray's
cluster-launcher schema, the Compose spec), and checked against the pins in pyproject.toml, so
that bumping Ray, Python or torch in one place and not the others fails here. hadolint lints the
Dockerfiles in `make lint`.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from decoupled.build import num_stages
from decoupled.config import load_config
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
RAY_IMAGE = re.compile(
    r"^rayproject/ray:(?P<ray>[\d.]+)-(?P<python>py\d+)-(?P<platform>cpu|cu\d+)$"
)
CLUSTER_FILES = ["launch/cluster-aws.yaml", "launch/cluster-local.yaml"]
SHARED = "/home/ray/shared"  # where every node mounts shared storage (data.root, --out)


@dataclass(frozen=True)
class Pins:
    version: str  # the project's
    ray: str
    torch: str
    python: str  # the image tag's form, e.g. py311


@pytest.fixture(scope="module")
def pins() -> Pins:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: dict[str, str] = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"(?P<name>[\w-]+)(\[[\w,-]+\])?==(?P<version>[\w.]+)", requirement)
        if match:
            found[match["name"]] = match["version"]
    # Images run the oldest Python the project supports: the one CI and mypy check.
    python = re.fullmatch(r">=\s*3\.(\d+)", project["requires-python"])
    assert python, project["requires-python"]
    return Pins(project["version"], found["ray"], found["torch"], f"py3{python[1]}")


def _load(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def _schema_check(*args: str) -> None:
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- Dockerfiles ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dockerfile:
    base: str  # FROM, with ARG defaults substituted
    runs: list[str]  # RUN commands, continuation lines joined, ARGs substituted
    workdir: str


def parse_dockerfile(path: str) -> Dockerfile:
    text = re.sub(r"\\\n\s*", " ", (ROOT / path).read_text())
    args: dict[str, str] = {}

    def substitute(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], value)

    base, runs, workdir = "", [], ""
    for line in text.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
        elif keyword == "FROM":
            assert not base, f"{path}: one stage expected"
            base = substitute(rest.strip())
        elif keyword == "RUN":
            runs.append(substitute(rest.replace('"', "")))
        elif keyword == "WORKDIR":
            workdir = rest.strip()
    return Dockerfile(base, runs, workdir)


@pytest.mark.parametrize(("name", "gpu"), [("gpu", True), ("cpu", False)])
def test_images_are_the_official_ray_image_of_the_pins(pins: Pins, name: str, gpu: bool) -> None:
    image = parse_dockerfile(f"docker/Dockerfile.{name}")
    base = RAY_IMAGE.match(image.base)
    assert base, image.base
    assert (base["ray"], base["python"]) == (pins.ray, pins.python)
    platform = base["platform"]
    assert platform.startswith("cu") if gpu else platform == "cpu"
    # The pinned torch, built for the image's CUDA (or CPU), installed before the project.
    torch = [run for run in image.runs if "torch==" in run]
    assert len(torch) == 1, image.runs
    assert f"torch=={pins.torch} " in torch[0] + " "
    assert f"--index-url https://download.pytorch.org/whl/{platform}" in torch[0]
    project = [i for i, run in enumerate(image.runs) if re.search(r"pip install .*\s\.(\s|$)", run)]
    assert project and project[0] > image.runs.index(torch[0]), image.runs


# -- docker/compose.yaml -------------------------------------------------------------------------
def test_compose_starts_a_head_and_two_workers_with_one_token(pins: Pins) -> None:
    _schema_check("--builtin-schema", "vendor.compose-spec", str(ROOT / "docker/compose.yaml"))
    services = _load("docker/compose.yaml")["services"]
    assert set(services) == {"head", "worker-1", "worker-2"}
    head_port = None
    for name, service in services.items():
        assert service["image"] == f"decoupled:{pins.version}-cpu"  # what `make docker-build` tags
        assert service["pull_policy"] == "never"
        assert service["shm_size"]
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")  # required, the same for all
        command = service["command"]
        assert command[:2] == ["ray", "start"] and "--block" in command
        if name == "head":
            head_port = next(a.split("=")[1] for a in command if a.startswith("--port="))
            assert "--head" in command
    for name in ("worker-1", "worker-2"):
        assert f"--address=head:{head_port}" in services[name]["command"]
        assert services[name]["depends_on"]["head"]["condition"] == "service_healthy"


# -- Ray cluster launcher (`ray up`) -------------------------------------------------------------
def _ray_schema() -> Path:
    # The schema `ray up` validates with, from the installed (pinned) Ray, without importing Ray.
    spec = importlib.util.find_spec("ray")
    assert spec and spec.origin
    return Path(spec.origin).parent / "autoscaler" / "ray-schema.json"


def _commands(config: dict[str, Any], key: str) -> str:
    return " ".join(config.get(key, []))


@pytest.mark.parametrize("path", CLUSTER_FILES)
def test_ray_up_files_pin_ray_torch_and_ask_for_gpus(pins: Pins, path: str) -> None:
    _schema_check("--schemafile", str(_ray_schema()), str(ROOT / path))
    config = _load(path)
    base = RAY_IMAGE.match(config["docker"]["image"])
    assert base, config["docker"]["image"]
    assert (base["ray"], base["python"]) == (pins.ray, pins.python)
    cuda = base["platform"]
    assert cuda.startswith("cu")
    setup = _commands(config, "setup_commands")
    assert f"torch=={pins.torch}" in setup
    assert f"--index-url https://download.pytorch.org/whl/{cuda}" in setup
    assert "pip install --no-cache-dir -e /home/ray/decoupled" in setup
    assert config["file_mounts"]["/home/ray/decoupled"] == "."
    # GPUs reach the containers that run stages, with a /dev/shm to match.
    worker_options = " ".join(
        config["docker"].get("run_options", []) + config["docker"].get("worker_run_options", [])
    )
    assert "--gpus all" in worker_options
    assert "--shm-size=" in worker_options
    # Token authentication on every node, from the token file mounted on every node.
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token ray start" in _commands(config, key), key
    if config["provider"]["type"] == "local":
        assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    else:
        workers = [
            t
            for name, t in config["available_node_types"].items()
            if name != config["head_node_type"]
        ]
        assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
        assert any(t["min_workers"] >= 1 for t in workers)  # a first job must not wait for one


# -- KubeRay ---------------------------------------------------------------------------------
def _pods(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def _check_ray_cluster_spec(cluster: dict[str, Any], pins: Pins) -> int:
    """The checks a RayCluster spec must pass; returns its number of GPUs."""
    assert cluster["rayVersion"] == pins.ray
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    claims = {_load("launch/kuberay/shared-pvc.yaml")["metadata"]["name"]}
    gpus = 0
    for name, pod in _pods(cluster):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            # docker/Dockerfile.gpu, as `make docker-build` tags it (under a registry's name).
            image = container["image"]
            assert image.rsplit("/", 1)[-1] == f"decoupled:{pins.version}-gpu", image
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            shm = mounts["/dev/shm"]["emptyDir"]
            assert shm["medium"] == "Memory" and shm["sizeLimit"], name
            assert mounts[SHARED]["persistentVolumeClaim"]["claimName"] in claims, name
            if name != "head":
                limits = container["resources"]["limits"]
                assert limits["nvidia.com/gpu"] >= 1, name
                assert (
                    container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
                )
    for group in cluster["workerGroupSpecs"]:
        per_pod = sum(
            c["resources"]["limits"]["nvidia.com/gpu"]
            for c in group["template"]["spec"]["containers"]
        )
        gpus += group["replicas"] * per_pod
    return gpus


def test_kuberay_cluster(pins: Pins) -> None:
    manifest = _load("launch/kuberay/raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert _check_ray_cluster_spec(manifest["spec"], pins) >= 1


def test_kuberay_job_runs_an_existing_config_it_can_place(pins: Pins) -> None:
    manifest = _load("launch/kuberay/rayjob.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    gpus = _check_ray_cluster_spec(spec["rayClusterSpec"], pins)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:5] == ["python", "-m", "decoupled.cli", "train", argv[4]]
    # The config is the image's copy of one in configs/: it must exist here, and the whole
    # command line must be one `decoupled train` accepts.
    workdir = parse_dockerfile("docker/Dockerfile.gpu").workdir
    config = Path(argv[4])
    assert config.is_relative_to(workdir), (config, workdir)
    local = ROOT / config.relative_to(workdir)
    assert local.is_file(), local
    out = argv.index("--out")
    overrides = argv[5:out]
    cfg = load_config(local, overrides)
    assert cfg.runtime.address == "auto"
    assert cfg.data.root.startswith(SHARED + "/") and argv[out + 1].startswith(SHARED + "/")
    assert num_stages(cfg) <= gpus  # one GPU per stage, or the job waits for ever
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert spec["shutdownAfterJobFinishes"] is True


def test_shared_volume_is_read_write_many() -> None:
    claim = _load("launch/kuberay/shared-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod at once


# -- Makefile targets --------------------------------------------------------------------------
def _make_n(*args: str) -> str:
    # -n prints what the target would run, running nothing: no engine, cloud or cluster needed.
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_makefile_targets(pins: Pins) -> None:
    build = _make_n("docker-build")
    for name in ("cpu", "gpu"):
        assert (
            f"docker build -f docker/Dockerfile.{name} -t decoupled:{pins.version}-{name} ."
            in build
        )
    assert "docker compose -f docker/compose.yaml up -d --wait" in _make_n("cluster-up")
    assert "docker compose -f docker/compose.yaml down" in _make_n("cluster-down")
    for path in CLUSTER_FILES:
        assert f"ray up {path}" in _make_n("cluster-up", f"CLUSTER={path}")
        assert f"ray down {path}" in _make_n("cluster-down", f"CLUSTER={path}")
    assert "decoupled submit configs/digits.yaml stages=2" in _make_n("submit", "ARGS=stages=2")
    assert (ROOT / "configs/digits.yaml").is_file()
    bench = _make_n("bench")
    assert "bench/throughput.py" in bench and "bench/transport.py" in bench
