"""Checkpoint format: one consistent cut of all stages per step, committed by a manifest.

Layout under a checkpoint directory (shared storage on a cluster):

    step-00000500/stage-0.pt ... stage-{K-1}.pt   each written by its own stage, atomically
    step-00000500/manifest.json                   written last: the cut is complete

A stage file holds the stage's module, synthesizer and both optimizers, its RNG state, and the
step. Every file is written to a temporary name and renamed, so a crash leaves either the old
file or the new one, never half of one. The manifest records each file's size and SHA-256, so
a truncated or swapped file is refused on load instead of being trained from.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from decoupled.config import ConfigError, config_to_dict, parse_config

FORMAT = "decoupled-checkpoint/1"
MANIFEST = "manifest.json"
_CUT = re.compile(r"^step-(\d{8})$")
# What a resumed run must share with the run that wrote the checkpoint.
IDENTITY_KEYS = (
    "seed",
    "stages",
    "data.name",
    "data.batch_size",
    "model",
    "method.name",
    "method.sg",
    "method.micro_batches",
    "optim",
    # The recurrent model's inputs, outputs and parameters (decoupled/recurrent/).
    "recurrent.alphabet",
    "recurrent.repeats",
    "recurrent.aux_weight",
)


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, truncated, foreign or does not fit this run."""


@dataclass(frozen=True)
class Cut:
    """A complete, verified cut: every stage's state at ``step`` steps done."""

    path: Path
    step: int
    num_stages: int
    config: dict[str, Any]

    def stage_file(self, index: int) -> Path:
        return self.path / f"stage-{index}.pt"


def cut_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_stage(
    root: Path, step: int, index: int, state: dict[str, Any], device: torch.device
) -> Path:
    """Write stage ``index``'s state for the cut at ``step`` (called by that stage)."""
    path = cut_dir(root, step) / f"stage-{index}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "step": step,
        "index": index,
        # Host tensors in the file: a cut written on a GPU loads on a machine without one.
        "state": to_cpu(state),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _atomic_write(path, buffer.getvalue())
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def commit_cut(root: Path, step: int, num_stages: int, config: dict[str, Any], keep: int) -> Cut:
    """Seal the cut at ``step`` once every stage wrote its file; then keep the newest ``keep``."""
    path = cut_dir(root, step)
    files = {}
    for index in range(num_stages):
        stage_file = path / f"stage-{index}.pt"
        if not stage_file.is_file():
            raise CheckpointError(f"cannot commit step {step}: {stage_file} is missing")
        files[stage_file.name] = {"bytes": stage_file.stat().st_size, "sha256": _digest(stage_file)}
    manifest = {
        "format": FORMAT,
        "step": step,
        "num_stages": num_stages,
        "files": files,
        "config": config,
    }
    _atomic_write(path / MANIFEST, json.dumps(manifest, indent=1).encode())
    for old in complete_steps(root)[:-keep]:
        shutil.rmtree(cut_dir(root, old), ignore_errors=True)
    return Cut(path, step, num_stages, config)


def complete_steps(root: Path) -> list[int]:
    """Steps of the cuts that have a manifest, oldest first (not yet verified)."""
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        match = _CUT.match(child.name)
        if match and (child / MANIFEST).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def read_cut(path: Path) -> Cut:
    """Verify a cut: a manifest of this format, and every file of the size and hash it names."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} checkpoint")
    for name, expected in manifest["files"].items():
        stage_file = path / name
        if not stage_file.is_file():
            raise CheckpointError(f"{stage_file}: missing from the checkpoint")
        size = stage_file.stat().st_size
        if size != expected["bytes"] or _digest(stage_file) != expected["sha256"]:
            raise CheckpointError(
                f"{stage_file}: truncated or altered ({size} bytes, the manifest says "
                f"{expected['bytes']})"
            )
    return Cut(path, int(manifest["step"]), int(manifest["num_stages"]), manifest["config"])


def latest_cut(root: Path) -> Cut | None:
    """The newest complete cut under ``root``, verified; None when there is none.

    A newest cut that fails verification is an error, not something to skip silently: resuming
    from an older cut than the user expects would repeat work without saying so."""
    steps = complete_steps(root)
    return read_cut(cut_dir(root, steps[-1])) if steps else None


def to_cpu(state: Any) -> Any:
    """``state`` with every tensor in it (nested dicts, lists, tuples) detached and on the host.

    For state dicts that leave their process: the driver of a Ray run may have no GPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: to_cpu(value) for key, value in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a named tuple
        return type(state)(*(to_cpu(value) for value in state))
    if isinstance(state, list | tuple):
        return type(state)(to_cpu(value) for value in state)
    return state


def load_stage(cut: Cut, index: int, device: torch.device) -> dict[str, Any]:
    """Stage ``index``'s state dict from ``cut``, its tensors on the host; restores the RNG state
    it was saved with (the CUDA one on ``device``).

    ``load_state_dict`` places the tensors: modules copy into their parameters' device, and
    optimizers move their state to the parameters' device, except Adam's ``step``, which must
    stay on the host (on the GPU every step would read it back with a sync per parameter)."""
    path = cut.stage_file(index)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} stage file")
    if payload["index"] != index or payload["step"] != cut.step:
        raise CheckpointError(f"{path}: holds stage {payload['index']} at step {payload['step']}")
    torch.set_rng_state(payload["rng"].cpu())
    if payload["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(payload["cuda_rng"].cpu(), device)
    state: dict[str, Any] = payload["state"]
    return state


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _as_read_now(config: dict[str, Any]) -> dict[str, Any]:
    """A cut's saved config as this version reads it: a key added since the cut was written
    takes its default (the behaviour the cut was trained with), so it is no difference."""
    try:
        return config_to_dict(parse_config(config))
    except ConfigError:  # a key since removed or renamed: compare what was saved
        return config


def check_compatible(cut: Cut, config: dict[str, Any], num_stages: int) -> None:
    """Refuse to resume a run whose model, method, data or optimizer differ from the cut's."""
    saved = _as_read_now(cut.config)
    problems = [
        f"{key}: checkpoint has {_lookup(saved, key)!r}, this run {_lookup(config, key)!r}"
        for key in IDENTITY_KEYS
        if _lookup(saved, key) != _lookup(config, key)
    ]
    if cut.num_stages != num_stages:
        problems.append(f"the checkpoint has {cut.num_stages} stages, this run {num_stages}")
    if problems:
        raise CheckpointError(
            f"{cut.path} does not fit this configuration:\n  " + "\n  ".join(problems)
        )
