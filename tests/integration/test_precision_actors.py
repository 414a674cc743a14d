"""train.precision on the Ray runtime: fp16 is refused, before any actor starts, where the
stages get no GPU (the GPU runs are in tests/unit/test_precision.py, marked gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest

from decoupled.config import ConfigError
from decoupled.data import Dataset
from decoupled.ray_runtime.controller import train_on_ray
from tests.conftest import digits_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]


def test_fp16_without_a_gpu_is_refused_naming_the_key(digits: Dataset, tmp_path: Path) -> None:
    cfg = digits_config("train.precision=fp16", "train.steps=2")
    with pytest.raises(ConfigError, match=r"train\.precision: fp16 needs a CUDA device"):
        train_on_ray(cfg, digits, tmp_path)
