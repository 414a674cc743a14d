"""A map-style torch Dataset with a random transform, read in stage 0's actor by DataLoader
workers: the actors train on exactly the batches the in-process trainer reads without workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from decoupled.checkpoint import latest_cut, load_stage
from decoupled.data import Dataset, dataset_info, load_data
from decoupled.local import LocalTrainer
from decoupled.ray_runtime.controller import train_on_ray
from tests.conftest import digits_config
from tests.integration.test_ray_trainer import _one_thread_reference, _tensors

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]

COMMON = [
    "method.name=dni",
    "stages=2",
    "train.steps=12",
    "model.hidden=32",
    "optim.lr=0.01",
]
# Random crops of the shipped digits, from the example (importable from the repository root,
# which the actors have on their path as the test process has).
CROPS = "data.name=examples.custom_dataset:digits"


def test_actors_with_workers_read_the_in_process_batches(digits: Dataset, tmp_path: Path) -> None:
    cfg = digits_config(*COMMON, CROPS, "runtime.lockstep=true", "data.workers=1")
    train_on_ray(cfg, dataset_info(cfg.data), tmp_path)  # the driver reads no sample
    cut = latest_cut(tmp_path / "checkpoints")
    assert cut is not None
    states = [_tensors(load_stage(cut, i, torch.device("cpu"))) for i in range(cut.num_stages)]
    # On the host, as the actors of this CPU cluster (a GPU would round otherwise).
    host = ["runtime.backend=local", "runtime.gpus_per_stage=0"]
    local_cfg = digits_config(*COMMON, CROPS, *host)
    local = LocalTrainer(local_cfg, load_data(local_cfg.data))
    _one_thread_reference(local)
    for actual, stage in zip(states, local.stages, strict=True):
        expected = _tensors(stage.state_dict())
        assert actual.keys() == expected.keys() and expected
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The crops matter: the same run on the digits as they are ends elsewhere.
    plain = LocalTrainer(digits_config(*COMMON, *host), digits)
    _one_thread_reference(plain)
    plain_state = _tensors(plain.stages[0].state_dict())
    assert any(not torch.allclose(v, states[0][k]) for k, v in plain_state.items())
