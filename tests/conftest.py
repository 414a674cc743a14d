"""Shared fixtures: small configs and the embedded digits, loaded once per session."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from decoupled.config import Config, DataConfig, load_config, parse_config
from decoupled.data import Dataset, load_dataset

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = ROOT / "configs" / "digits.yaml"

# One intra-op thread for everything trained in the test process. These models are too small to
# gain from a second thread, and where the cores are shared (Ray actors, other jobs on a CI box)
# torch's threads spin at each barrier for a core that is busy: a 4 s in-process run took 20 to
# 70 s on a loaded 2-core machine. The stage actors run one thread each already.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset(DataConfig(name="digits"))


def digits_config(*overrides: str) -> Config:
    """The shipped default experiment with overrides, progress bar off, split evenly (a
    measured split could differ between two runs that a test compares)."""
    return load_config(DIGITS_CONFIG, ["train.progress=false", "model.boundaries=even", *overrides])


def small_config(overrides: Sequence[str] = ()) -> Config:
    """A tiny FCN on digits for fast protocol tests."""
    base = [
        "data.name=digits",
        "model.layers=4",
        "model.hidden=32",
        "train.progress=false",
        "runtime.backend=local",
        "model.boundaries=even",
    ]
    return parse_config({}, [*base, *overrides])


def with_history(cfg: Config, history: int) -> Config:
    """``cfg`` with ``method.sg.history`` set past the config check (which refuses a history
    shorter than the in-process delay), to see what a target that comes too late does."""
    sg = dataclasses.replace(cfg.method.sg, history=history)
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, sg=sg))


# A tiny corpus for the gpt model (data.name=charlm with data.root a text file): no download.
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity. "
) * 12


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TEXT)
    return path


def gpt_config(corpus: Path, overrides: Sequence[str] = ()) -> Config:
    """A tiny GPT (3 blocks of width 16, windows of 8 characters) on ``corpus``."""
    base = [
        "data.name=charlm",
        f"data.root={corpus}",
        "data.batch_size=8",
        "model.name=gpt",
        "model.layers=3",
        "model.hidden=16",
        "model.heads=2",
        "model.context=8",
        "method.sg.hidden=32",
        "recurrent.eval_chars=200",
        "train.progress=false",
        "runtime.backend=local",
        "model.boundaries=even",
        "runtime.gpus_per_stage=0",  # on the host also where there is a GPU, as the CPU actors
    ]
    return parse_config({}, [*base, *overrides])


@pytest.fixture(scope="session")
def text_windows(corpus: Path) -> Dataset:
    cfg = gpt_config(corpus)
    return load_dataset(cfg.data, cfg.model.context, cfg.recurrent.eval_chars)


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """W&B's own files under a fresh folder of this test, and a fresh client around it."""
    import wandb  # here, not at the top: most tests never touch W&B, and it is slow to import

    from tests.wandb_records import isolate_wandb

    home = tmp_path / "wandb-home"
    isolate_wandb(home, monkeypatch)
    yield home
    wandb.teardown()
