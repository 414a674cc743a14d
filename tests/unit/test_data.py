"""Dataset loading from real files in tmp_path, and the step-addressed batch stream."""

from __future__ import annotations

import gzip
import io
import pickle
import re
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from decoupled.config import DataConfig
from decoupled.data import (
    DataError,
    TrainStream,
    dataset_info,
    describe,
    eval_batches,
    load_dataset,
)

IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def idx_bytes(a: np.ndarray, magic: int | None = None) -> bytes:
    """The IDX encoding of a uint8 array; ``magic`` overrides the header to make bad files."""
    head = magic if magic is not None else 0x0800 | a.ndim
    dims = b"".join(d.to_bytes(4, "big") for d in a.shape)
    return head.to_bytes(4, "big") + dims + a.astype(np.uint8).tobytes()


def write_idx(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_mnist(folder: Path, gz: bool, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    """Write the four IDX files of a tiny MNIST-like set to ``folder``; returns the raw arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, name in IDX_NAMES.items():
        write_idx(folder / (name + (".gz" if gz else "")), idx_bytes(arrays[key]))
    return arrays


def standardise(train: np.ndarray, other: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What load_dataset should produce for single-channel (N, H, W) raw images."""
    t = torch.from_numpy(train.astype(np.float32)).unsqueeze(1)
    o = torch.from_numpy(other.astype(np.float32)).unsqueeze(1)
    mean, std = t.mean(), t.std()
    return (t - mean) / std, (o - mean) / std


def cfg(name: str, root: Path, download: bool = False) -> DataConfig:
    return DataConfig(name=name, root=str(root), download=download)


def test_digits_loads_standardised_from_package(tmp_path: Path) -> None:
    ds = load_dataset(cfg("digits", tmp_path / "ignored"))
    assert ds.train_x.shape == (1438, 1, 8, 8) and ds.test_x.shape == (359, 1, 8, 8)
    assert ds.train_x.dtype == ds.test_x.dtype == torch.float32
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert set(ds.train_y.tolist()) == set(range(10))
    assert abs(float(ds.train_x.mean())) < 1e-4
    assert float(ds.train_x.std()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("name", "subdir", "gz"),
    [
        ("mnist", "", False),
        ("mnist", "mnist", True),
        ("mnist", "mnist/raw", False),
        ("mnist", "MNIST/raw", True),
        ("fashion_mnist", "fashion_mnist", False),
        ("fashion_mnist", "FashionMNIST/raw", True),
    ],
)
def test_idx_datasets_round_trip(tmp_path: Path, name: str, subdir: str, gz: bool) -> None:
    raw = make_mnist(tmp_path / subdir, gz)
    ds = load_dataset(cfg(name, tmp_path))
    assert ds.name == name and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    want_train, want_test = standardise(raw["train_x"], raw["test_x"])
    torch.testing.assert_close(ds.train_x, want_train)
    torch.testing.assert_close(ds.test_x, want_test)
    assert ds.train_y.tolist() == raw["train_y"].tolist()
    assert ds.test_y.tolist() == raw["test_y"].tolist()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (idx_bytes(np.zeros((3, 28, 28)), magic=0x0801), "magic"),  # a label file's magic
        (idx_bytes(np.zeros((3, 28, 28)), magic=0x0D03), "magic"),  # float32 dtype code
        (idx_bytes(np.zeros((3, 28, 28)))[:-1], "bytes of data"),  # truncated data
        (idx_bytes(np.zeros((3, 28, 28)))[:10], "header"),  # truncated header
    ],
)
def test_malformed_idx_names_the_file(tmp_path: Path, data: bytes, problem: str) -> None:
    make_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", data)
    with pytest.raises(DataError, match=problem) as e:
        load_dataset(cfg("mnist", tmp_path))
    assert "t10k-images-idx3-ubyte" in str(e.value)


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DataError, match=re.escape("train-labels-idx1-ubyte.gz")):
        load_dataset(cfg("mnist", tmp_path))


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(11)))
    with pytest.raises(DataError, match=r"12 images .* 11 labels"):
        load_dataset(cfg("mnist", tmp_path))


def test_missing_idx_file_says_what_and_how(tmp_path: Path) -> None:
    make_mnist(tmp_path / "fashion_mnist", gz=True)
    (tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_dataset(cfg("fashion_mnist", tmp_path))
    message = str(e.value)
    assert "t10k-labels-idx1-ubyte" in message and "data.download=true" in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message


def cifar_batch(n: int, seed: int) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
    }


def make_cifar(folder: Path) -> dict[str, dict[bytes, Any]]:
    """Five train batches of 4 images and a test batch of 3, pickled like the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(4, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(3, 99)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch))
    return batches


@pytest.mark.parametrize("subdir", ["cifar-10-batches-py", ""])
def test_cifar10_loads(tmp_path: Path, subdir: str) -> None:
    batches = make_cifar(tmp_path / subdir)
    ds = load_dataset(cfg("cifar10", tmp_path))
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32)
    labels = [y for i in range(1, 6) for y in batches[f"data_batch_{i}"][b"labels"]]
    assert ds.train_y.tolist() == labels
    assert ds.test_y.tolist() == batches["test_batch"][b"labels"]
    # Channel-major rows: a standardised channel is an affine image of the raw bytes.
    first_red = torch.tensor(batches["data_batch_1"][b"data"][0, :1024], dtype=torch.float32)
    got = ds.train_x[0, 0].flatten()
    assert torch.corrcoef(torch.stack([got, first_red]))[0, 1] > 0.9999
    assert ds.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def test_cifar10_missing_or_malformed_batch_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3.*data\.download=true"):
        load_dataset(cfg("cifar10", tmp_path))
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(cfg("cifar10", tmp_path))
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 10), np.uint8)}))
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(cfg("cifar10", tmp_path))


def offline(url: str, timeout: float = 0.0) -> Any:
    raise OSError("network is unreachable")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_download_failure_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("PATH", str(tmp_path / "no-clients"))  # nor a package registry's client
    with pytest.raises(DataError, match=r"download of http.* failed .*unreachable"):
        load_dataset(cfg(name, tmp_path, download=True))
    assert not list(tmp_path.rglob("*.part"))


def test_download_fetches_missing_idx_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = make_mnist(tmp_path / "server", gz=True)
    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0.0) -> io.BytesIO:
        urls.append(url)
        return io.BytesIO((tmp_path / "server" / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ds = load_dataset(cfg("mnist", tmp_path / "root", download=True))
    assert ds.train_y.tolist() == served["train_y"].tolist()
    assert len(urls) == 4 and all(u.startswith("https://ossci-datasets") for u in urls)
    assert (tmp_path / "root" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_download_extracts_only_cifar_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        evil = tarfile.TarInfo("../evil")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive.getvalue())
    )
    root = tmp_path / "root"
    ds = load_dataset(cfg("cifar10", root, download=True))
    assert ds.train_x.shape == (20, 3, 32, 32)
    assert not (tmp_path / "evil").exists()


def indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, 1, 1, 1) holding each sample's index, y (n,) the same, so batches show the order."""
    y = torch.arange(n)
    return y.to(torch.float32).view(n, 1, 1, 1), y


def epoch_order(stream: TrainStream, epoch: int) -> list[int]:
    """Sample indices (see ``indexed``) in the order one epoch of ``stream`` visits them."""
    first = epoch * stream.steps_per_epoch
    steps = range(first, first + stream.steps_per_epoch)
    return torch.cat([stream.batch(step)[1] for step in steps]).tolist()


def test_stream_is_a_function_of_seed_and_step() -> None:
    x, y = indexed(12)
    a, b = TrainStream(x, y, 4, seed=1), TrainStream(x, y, 4, seed=1)
    assert a.steps_per_epoch == 3
    for step in (0, 5, 2, 7, 0):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 1, 1, 1) and torch.equal(xa.flatten().long(), ya)
    assert epoch_order(a, 0) != epoch_order(TrainStream(x, y, 4, seed=2), 0)


def test_stream_epochs_are_permutations_in_fresh_orders() -> None:
    x, y = indexed(12)
    stream = TrainStream(x, y, 4, seed=0)
    epochs = [epoch_order(stream, e) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_stream_drops_the_partial_batch() -> None:
    x, y = indexed(10)
    stream = TrainStream(x, y, 3, seed=0)
    assert stream.steps_per_epoch == 3
    assert len(set(epoch_order(stream, 0))) == 9
    with pytest.raises(ValueError, match="batch_size"):
        TrainStream(x, y, 11, seed=0)


def test_resumed_stream_sees_the_same_batches() -> None:
    x, y = indexed(50)
    running = TrainStream(x, y, 8, seed=3)
    before = [running.batch(step)[1] for step in range(20)]
    resumed = TrainStream(x, y, 8, seed=3)
    for step in range(13, 20):
        assert torch.equal(resumed.batch(step)[1], before[step])


@pytest.mark.parametrize("batch_size", [1, 3, 7, 10, 64])
def test_eval_batches_cover_every_sample_in_order(batch_size: int) -> None:
    x, y = indexed(10)
    batches = list(eval_batches(x, y, batch_size))
    assert all(len(bx) == len(by) for bx, by in batches)
    assert torch.equal(torch.cat([by for _, by in batches]), y)
    assert torch.equal(torch.cat([bx for bx, _ in batches]), x)


@pytest.mark.parametrize("gz", [False, True])
def test_dataset_info_reads_headers_only_and_checks_sizes(tmp_path: Path, gz: bool) -> None:
    make_mnist(tmp_path, gz)
    info = dataset_info(cfg("mnist", tmp_path))
    assert info == describe(load_dataset(cfg("mnist", tmp_path)))
    assert (info.input_shape, info.train_size, info.test_size) == ((1, 28, 28), 12, 5)
    # A body cut short is found without reading it (a .gz by the size in its trailer).
    name = IDX_NAMES["train_x"] + (".gz" if gz else "")
    images = np.zeros((12, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / name, idx_bytes(images)[:-100])
    with pytest.raises(DataError, match=r"need 9408 bytes of data, found 9308"):
        dataset_info(cfg("mnist", tmp_path))
