"""Map-style torch Datasets read by step (decoupled/loader.py): the same batches for the same
(seed, step) after a resume and with any number of workers; bad factory returns refused."""

from __future__ import annotations

import random
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import decoupled
from decoupled.cli import main
from decoupled.config import ConfigError, DataConfig, parse_config
from decoupled.data import TrainStream, dataset_info, load_data, load_dataset
from decoupled.loader import (
    ArrayFiles,
    LoaderStream,
    MapData,
    _Seeded,
    _StepBatches,
    loader_eval_batches,
    mix,
)
from tests.conftest import DIGITS_CONFIG


class Jittered(Dataset[tuple[torch.Tensor, int]]):
    """Sample i is i plus noise from every RNG a transform might use (torch, numpy, random)."""

    classes = ("even", "odd")

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        noise = torch.rand(3) + float(np.random.rand()) + random.random()
        return torch.full((3,), float(i)) + noise, i % 2


def batches(stream: LoaderStream, steps: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [stream.batch(s) for s in steps]


def assert_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_resumed_stream_gives_the_uninterrupted_batches_transforms_included() -> None:
    ds = Jittered(40)
    whole = batches(LoaderStream(ds, 8, seed=3, workers=0), range(12))  # 5 steps an epoch
    resumed = batches(LoaderStream(ds, 8, seed=3, workers=0), range(7, 12))
    assert_same(whole[7:], resumed)
    # The transforms are random: the same sample gets other noise at another step, and
    # another seed gives other batches.
    x0, y0 = whole[0]
    assert sorted(x0[:, 0].floor().tolist()) != sorted(whole[5][0][:, 0].floor().tolist())
    other = batches(LoaderStream(ds, 8, seed=4, workers=0), range(2))
    assert not torch.equal(other[0][0], x0)
    assert y0.dtype == torch.int64 and x0.dtype == torch.float32 and x0.shape == (8, 3)


def test_the_stream_serves_a_repeated_or_earlier_step() -> None:
    stream = LoaderStream(Jittered(40), 8, seed=1, workers=0)
    first = batches(stream, range(6))
    assert_same([stream.batch(5), stream.batch(2), stream.batch(3)], [first[5], first[2], first[3]])


def test_workers_give_the_batches_of_the_stages_own_process() -> None:
    ds = Jittered(40)
    inline = batches(LoaderStream(ds, 8, seed=5, workers=0), range(3, 9))
    stream = LoaderStream(ds, 8, seed=5, workers=2)
    try:
        assert_same(batches(stream, range(3, 9)), inline)
    finally:
        stream.close()
    a = list(loader_eval_batches(ds, 16, seed=5, workers=0))
    b = list(loader_eval_batches(ds, 16, seed=5, workers=2))
    assert_same(a, b)
    assert [len(y) for _, y in a] == [16, 16, 8]


def test_reading_leaves_the_processs_random_state_alone() -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    LoaderStream(Jittered(40), 8, seed=1, workers=0).batch(0)
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == expected[1:]
    torch.manual_seed(0)
    LoaderStream(Jittered(40), 8, seed=1, workers=0).batch(0)
    assert torch.equal(torch.rand(3), expected[0])


def test_each_item_of_a_batch_is_read_under_its_own_seed() -> None:
    """A batch is fetched at once (RNG states saved once), yet sample j of step t is what
    reading it alone under its (seed, step, j) key gives: no item's noise depends on another."""
    ds, step = Jittered(40), 3
    x, y = LoaderStream(ds, 8, seed=2, workers=0).batch(step)
    keys = next(iter(_StepBatches(40, 8, seed=2, start=step)))
    assert [seed for _, seed in keys] == [mix(2, step, j) for j in range(8)]
    for j, key in enumerate(keys):
        alone_x, alone_y = _Seeded(ds)[key]
        assert torch.equal(alone_x, x[j]) and alone_y == int(y[j])


def test_a_tensor_dataset_reads_as_the_tensor_stream(digits: Any) -> None:
    ds = TensorDataset(digits.train_x, digits.train_y)
    loader = LoaderStream(ds, 64, seed=7, workers=0)
    tensors = TrainStream(digits.train_x, digits.train_y, 64, seed=7)
    assert loader.steps_per_epoch == tensors.steps_per_epoch
    for step in (0, 1, tensors.steps_per_epoch + 2):
        xa, ya = loader.batch(step)
        xb, yb = tensors.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


USER_DATA = """
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset
from decoupled.loader import MapData


class Flipped(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), int(self.y[i])


def blobs():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 1, 2, 3, generator=g) + 3 * y.view(-1, 1, 1, 1).float()
    return x, y


def flipped(cfg):
    x, y = blobs()
    return MapData(Flipped(x[:240], y[:240]), TensorDataset(x[240:], y[240:]), 3)


class Stream(IterableDataset):
    def __iter__(self):
        return iter([])


def iterable(cfg):
    return Stream(), Stream()


def no_classes(cfg):
    x, y = blobs()
    return TensorDataset(x, y), TensorDataset(x, y)


def one_set(cfg):
    x, y = blobs()
    return TensorDataset(x, y)


def bad_items(cfg):
    x, y = blobs()
    return MapData(TensorDataset(x), TensorDataset(x), 3)
"""


@pytest.fixture
def user_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "user_data.py").write_text(textwrap.dedent(USER_DATA))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_data"
    sys.modules.pop("user_data", None)


SHORT = ["train.progress=false", "runtime.backend=local", "stages=2", "model.boundaries=even"]


def test_a_factorys_datasets_train_and_describe_without_a_pass_over_them(
    user_data: str, tmp_path: Path
) -> None:
    cfg = DataConfig(name=f"{user_data}:flipped", batch_size=40)
    info = dataset_info(cfg)
    assert (info.input_shape, info.num_classes, info.train_size, info.test_size) == (
        (1, 2, 3),
        3,
        240,
        60,
    )
    assert isinstance(load_data(cfg), MapData)
    with pytest.raises(ConfigError, match=r"returned torch Datasets, and this needs"):
        load_dataset(cfg)
    summary = decoupled.train(
        {"data": {"name": cfg.name, "batch_size": 40, "workers": 1}},
        [
            *SHORT,
            "method.name=cdni",
            "model.layers=2",
            "optim.lr=0.01",
            "train.steps=48",
            "train.eval_every=48",
        ],
        out=tmp_path / "run",
    )
    assert summary["test_accuracy"] > 0.9


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("iterable", "data.name: user_data:iterable returned an IterableDataset as its train set"),
        ("no_classes", "do not say how many classes there are"),
        ("one_set", "must return a Dataset, (train_x, train_y, test_x, test_y), or map-style"),
        ("bad_items", "item 0 of the train set must be (x, label) with x a tensor and label an"),
    ],
)
def test_a_bad_return_exits_2_naming_the_key_and_reason(
    user_data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], function: str, message: str
) -> None:
    argv = ["train", str(DIGITS_CONFIG), *SHORT, "train.steps=5", f"data.name=user_data:{function}"]
    code = main([*argv, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_workers_are_refused_for_data_read_by_indexing() -> None:
    with pytest.raises(
        ConfigError, match=r"data\.workers: reads the torch Datasets of a data\.name"
    ):
        parse_config({"data": {"workers": 2}})
    with pytest.raises(ConfigError, match=r"data\.workers: must be >= 0"):
        parse_config({"data": {"name": "m:f", "workers": -1}})


def test_array_files_read_shards_through_memory_maps(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (50, 1, 4, 4)).astype(np.uint8)
    y = rng.integers(0, 10, 50)
    files: tuple[list[str], list[str]] = ([], [])
    for k, rows in enumerate((slice(0, 20), slice(20, 50))):
        arrays: tuple[np.ndarray, np.ndarray] = (x, y)
        for names, array, kind in zip(files, arrays, ("x", "y"), strict=True):
            names.append(str(tmp_path / f"{kind}{k}.npy"))
            np.save(names[-1], array[rows])
    ds = ArrayFiles(*files)
    assert len(ds) == 50 and ds._maps is None  # nothing read but the headers
    for i in (0, 19, 20, 49):
        sample, label = ds[i]
        assert torch.equal(sample, torch.from_numpy(x[i].astype(np.float32))) and label == y[i]
    opened: Any = vars(ds)["_maps"]
    assert isinstance(opened[1][0], np.memmap)  # read in place, not loaded
    inline = batches(LoaderStream(ds, 16, seed=2, workers=0), range(4))
    assert_same(batches(LoaderStream(ds, 16, seed=2, workers=1), range(4)), inline)
