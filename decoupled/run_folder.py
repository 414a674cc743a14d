"""Run folders: one run per folder, never mixed, never silently overwritten.

A second run into a folder that already holds one would append its metrics to the first run's,
replace its summary, and leave the first run's checkpoints beside its own, where a later
``--resume`` would pick them up. So a folder that holds a run is refused unless the user says
which of the two they meant: ``--resume`` (continue it) or ``--overwrite`` (delete it first).
Default folders are created with ``mkdir``, which fails if the name is taken, so two runs
started in the same second (on one machine or on shared storage) get different folders.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from decoupled.checkpoint import complete_steps

# What a run writes into its folder. A folder with any of the first three holds a run's records;
# config.yaml alone is a run that stopped before its first step (bad data, no cluster), which
# leaves nothing to lose. --overwrite deletes all of them and nothing else: `--out .` in a
# project folder must not cost the user their files.
RECORDS = ("metrics.jsonl", "summary.json", "checkpoints")
ARTEFACTS = (*RECORDS, "config.yaml", "summary.json.tmp", "error.log", "plots", "wandb")
UNIQUE_TRIES = 1000


class RunFolderError(Exception):
    """``--out`` names a folder that cannot take this run (exit 2)."""


def holds_run(folder: Path) -> list[str]:
    """What in ``folder`` belongs to an earlier run's records, described for a message."""
    found = []
    for name in RECORDS:
        path = folder / name
        if name == "checkpoints":
            if path.is_dir() and any(path.iterdir()):
                steps = complete_steps(path)
                cuts = f"cuts at steps {', '.join(map(str, steps))}" if steps else "no complete cut"
                found.append(f"checkpoints/ ({cuts})")
        elif path.exists():
            found.append(name)
    return found


def prepare(folder: Path, *, overwrite: bool) -> None:
    """Make ``folder`` ready for a new run: refuse one that holds a run unless ``overwrite``,
    which deletes that run's files first."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder}: exists and is not a folder")
    found = holds_run(folder) if folder.is_dir() else []
    if found and not overwrite:
        raise RunFolderError(
            f"--out {folder} already holds a run ({', '.join(found)}); continue it with "
            f"--resume {folder}, or pick a new --out (--overwrite deletes that run first)"
        )
    if found:
        for name in ARTEFACTS:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)


def new_default(parent: Path, method: str, stages: int) -> Path:
    """Create and return ``parent/<time>-<method>-k<K>``, with ``-2``, ``-3``... appended when
    another run took that name (mkdir is atomic, so two runs never share a folder)."""
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{method}-k{stages}"
    for n in range(1, UNIQUE_TRIES + 1):
        folder = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise RunFolderError(f"{parent}: {UNIQUE_TRIES} runs named {stem}* already; clean it up")
