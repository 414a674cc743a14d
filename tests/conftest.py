"""Shared fixtures: small configs and the embedded digits, loaded once per session."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from decoupled.config import Config, DataConfig, load_config, parse_config
from decoupled.data import Dataset, load_dataset

ROOT = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = ROOT / "configs" / "digits.yaml"


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset(DataConfig(name="digits"))


def digits_config(*overrides: str) -> Config:
    """The shipped default experiment with overrides, progress bar off."""
    return load_config(DIGITS_CONFIG, ["train.progress=false", *overrides])


def small_config(overrides: Sequence[str] = ()) -> Config:
    """A tiny FCN on digits for fast protocol tests."""
    base = [
        "data.name=digits",
        "model.layers=4",
        "model.hidden=32",
        "train.progress=false",
        "runtime.backend=local",
    ]
    return parse_config({}, [*base, *overrides])
