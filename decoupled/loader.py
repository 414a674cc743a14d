"""Map-style torch Datasets (``__len__``/``__getitem__``, transforms included) read by step.

A ``data.name`` factory may return torch Datasets instead of tensors: ``MapData(train, test,
num_classes)``, or ``(train, test)`` when the train set says its classes (``num_classes`` or a
``classes`` list, as torchvision's do). Stage 0 then reads batch ``step`` through a
``DataLoader`` with ``data.workers`` worker processes, and the batch is a pure function of
``(seed, step)`` however many workers read it and wherever the run resumed:

- the sample indices of step t are the slice t of its epoch's permutation, drawn from
  ``(seed, epoch)`` exactly as ``TrainStream`` draws it (a TensorDataset gives TrainStream's
  batches);
- every sample's random transform runs with torch's, numpy's and Python's RNGs seeded from
  ``(seed, step, position in the batch)``, in whichever process reads it.

The driver of a Ray run reads the lengths and, unless ``MapData.input_shape`` says it, one
sample for its shape; the samples themselves are read only in stage 0's actor.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import Dataset as TorchDataset

from decoupled.config import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]  # x (B, ...) float32, y (B,) int64
EVAL_STEP = -1  # the "step" whose seeds a test set's transforms run with: every evaluation alike


@dataclass(frozen=True)
class MapData:
    """Train and test splits as map-style torch Datasets whose items are ``(x, label)``: x a
    tensor (C, H, W) or (D,), label an int. ``input_shape`` (x's shape) spares the driver
    reading a sample to learn it."""

    train: TorchDataset[Any]
    test: TorchDataset[Any]
    num_classes: int
    input_shape: tuple[int, ...] | None = None
    name: str = ""


class ArrayFiles(TorchDataset[tuple[torch.Tensor, int]]):
    """Samples in ``.npy`` files, read through memory maps: a split larger than memory, in
    shards (``images[k]`` (N_k, ...) and ``labels[k]`` (N_k,) integers, the shards in order).
    Only the headers are read here; each process that reads samples maps the files itself, and
    the pages a batch touches are all it holds."""

    def __init__(self, images: list[str], labels: list[str]) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} image files but {len(labels)} label files")
        self.images, self.labels = list(images), list(labels)
        sizes = []
        for x_path, y_path in zip(self.images, self.labels, strict=True):
            x_rows = len(np.load(x_path, mmap_mode="r"))
            y_rows = len(np.load(y_path, mmap_mode="r"))
            if x_rows != y_rows:
                raise ValueError(f"{x_path} has {x_rows} samples but {y_path} has {y_rows}")
            sizes.append(x_rows)
        self.starts = np.cumsum([0, *sizes])
        self._maps: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._maps is None:  # opened in the process that reads (a DataLoader worker, say)
            self._maps = [
                (np.load(x, mmap_mode="r"), np.load(y, mmap_mode="r"))
                for x, y in zip(self.images, self.labels, strict=True)
            ]
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        x, y = self._maps[shard]
        row = index - int(self.starts[shard])
        return torch.from_numpy(np.array(x[row], dtype=np.float32)), int(y[row])

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are not pickled to worker processes or Ray actors: each maps its own.
        return {**self.__dict__, "_maps": None}


def mix(*values: int) -> int:
    """A 63-bit seed of ``values`` (splitmix64 over them): neighbouring inputs share nothing."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value % (1 << 64))) * 0xBF58476D1CE4E5B9 % (1 << 64)
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB % (1 << 64)
        state ^= state >> 29
    return state % (1 << 63)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s permutation (``TrainStream``'s: both streams agree)."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9) % (1 << 63)


def as_map_data(made: Any, name: str) -> MapData | None:
    """What a data factory returned, as ``MapData`` when it is torch Datasets (None when it is
    not); a ConfigError naming ``data.name`` when they cannot be read by index."""
    if isinstance(made, MapData):
        pair: tuple[Any, Any] = (made.train, made.test)
    elif isinstance(made, tuple | list) and len(made) == 2:
        pair = (made[0], made[1])
    else:
        return None
    for split, ds in zip(("train", "test"), pair, strict=True):
        if isinstance(ds, IterableDataset):
            raise ConfigError(
                f"data.name: {name} returned an IterableDataset as its {split} set; a stage "
                "reads batches by step, so it needs a map-style Dataset (__len__ and "
                "__getitem__), or see the Ray Data section of docs/data.md"
            )
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise ConfigError(
                f"data.name: {name} returned a {type(ds).__name__} as its {split} set; expected "
                "a map-style torch Dataset (__len__ and __getitem__)"
            )
        if len(ds) == 0:
            raise ConfigError(f"data.name: {name} returned an empty {split} set")
    if isinstance(made, MapData):
        return MapData(made.train, made.test, made.num_classes, made.input_shape, made.name or name)
    classes = _class_count(pair[0])
    if classes is None:
        raise ConfigError(
            f"data.name: {name} returned torch Datasets that do not say how many classes there "
            "are: return decoupled.loader.MapData(train, test, num_classes=...), or give the "
            "train set a num_classes attribute or a classes list"
        )
    return MapData(pair[0], pair[1], classes, None, name)


def _class_count(ds: Any) -> int | None:
    if isinstance(getattr(ds, "num_classes", None), int):
        return int(ds.num_classes)
    classes = getattr(ds, "classes", None)
    return len(classes) if isinstance(classes, list | tuple) and classes else None


def sample_shape(data: MapData) -> tuple[int, ...]:
    """One sample's shape: ``data.input_shape``, or read from the train set's first item."""
    if data.input_shape is not None:
        return tuple(data.input_shape)
    x, _ = _checked_item(data.train[0], data.name, 0)
    return tuple(x.shape)


def _checked_item(item: Any, name: str, index: int) -> tuple[torch.Tensor, int]:
    ok = isinstance(item, tuple | list) and len(item) == 2
    x = item[0] if ok else None
    label = item[1] if ok else None
    if isinstance(label, torch.Tensor | np.integer) and getattr(label, "ndim", 0) == 0:
        label = int(label)
    if not isinstance(x, torch.Tensor) or not isinstance(label, int) or isinstance(label, bool):
        raise ConfigError(
            f"data.name: {name}: item {index} of the train set must be (x, label) with x a "
            f"tensor and label an int, got {_kind(item)}"
        )
    return x, label


def _kind(item: Any) -> str:
    if isinstance(item, tuple | list):
        return "(" + ", ".join(type(v).__name__ for v in item) + ")"
    return type(item).__name__


class _Seeded(TorchDataset[Any]):
    """``dataset`` read at ``(index, seed)``: the item's transforms run with every RNG seeded
    from ``seed``, and the process's RNGs are as they were afterwards (workers=0 reads in the
    stage's own process, whose dropout or init must not depend on the data)."""

    def __init__(self, dataset: TorchDataset[Any]) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch's items (the DataLoader's fetch of a batch): the process's RNG states are
        saved and restored once per batch, not per item (0.1 ms an item, 7 ms a batch of 64)."""
        cpu = torch.default_generator
        states = cpu.get_state(), random.getstate(), np.random.get_state()
        try:
            items = []
            for index, seed in keys:
                # The CPU generator alone: torch.manual_seed also queues a CUDA seeding with
                # its stack trace (a millisecond a sample), and transforms of data run on the CPU.
                cpu.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                items.append(self.dataset[index])
            return items
        finally:
            cpu.set_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))


class _StepBatches:
    """A DataLoader's batch sampler: the batches of steps ``start``, ``start + 1``, ... (endless),
    each a list of ``(index, seed)``."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int) -> None:
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.steps_per_epoch = n // batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, b = self.start, self.batch_size
        epoch, perm = -1, torch.empty(0, dtype=torch.int64)
        while True:
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(epoch_seed(self.seed, e))
                epoch, perm = e, torch.randperm(self.n, generator=g)
            rows = perm[i * b : (i + 1) * b].tolist()
            yield [(row, mix(self.seed, step, j)) for j, row in enumerate(rows)]
            step += 1


def _collate(items: list[Any]) -> Batch:
    xs, ys = zip(*items, strict=True)
    x = torch.stack([torch.as_tensor(v) for v in xs])
    y = torch.as_tensor([int(v) for v in ys], dtype=torch.int64)
    return (x if x.is_floating_point() else x.float()), y


def _loader(dataset: TorchDataset[Any], batches: Any, workers: int, seed: int) -> DataLoader[Any]:
    return DataLoader(
        _Seeded(dataset),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        # Worker processes seed nothing of their own that a sample could depend on: every
        # item is read under its own seed. This only keeps the workers' base seeds fixed.
        generator=torch.Generator().manual_seed(seed),
    )


class LoaderStream:
    """Training batches of a map-style Dataset by global step, through a DataLoader with
    ``workers`` processes (``TrainStream``'s interface). Steps are expected in order, as a run
    reads them; asking for another step (a resume, the probe's repeat of the last batch) is
    served too, by the last batch or a loader restarted at that step."""

    def __init__(
        self, dataset: TorchDataset[Any], batch_size: int, seed: int, workers: int
    ) -> None:
        n = len(cast(Sized, dataset))
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size {batch_size} must be in 1..{n} (the train set size)")
        self.dataset, self.batch_size, self.seed, self.workers = dataset, batch_size, seed, workers
        self.n = n
        self.steps_per_epoch = n // batch_size
        self._batches: Iterator[Batch] | None = None
        self._next = -1  # the step the open loader yields next
        self._last: tuple[int, Batch] | None = None

    def batch(self, step: int) -> Batch:
        """Batch ``step``: x (B, ...), y (B,)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if self._batches is None or step != self._next:
            self.close()
            sampler = _StepBatches(self.n, self.batch_size, self.seed, step)
            self._batches = iter(_loader(self.dataset, sampler, self.workers, self.seed))
        batch = next(self._batches)
        self._next, self._last = step + 1, (step, batch)
        return batch

    def close(self) -> None:
        """Stop the worker processes (a new ``batch`` call starts them again): the loader's
        iterator shuts its workers down when its last reference goes."""
        self._batches = None


class _EvalBatches:
    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, self.n, self.batch_size):
            stop = min(start + self.batch_size, self.n)
            yield [(i, mix(self.seed, EVAL_STEP, i)) for i in range(start, stop)]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def loader_eval_batches(
    dataset: TorchDataset[Any], batch_size: int, seed: int, workers: int
) -> Iterator[Batch]:
    """The test set in order, in batches (the last may be smaller), every evaluation alike."""
    n = len(cast(Sized, dataset))
    yield from _loader(dataset, _EvalBatches(n, batch_size, seed), workers, seed)


__all__ = [
    "ArrayFiles",
    "LoaderStream",
    "MapData",
    "as_map_data",
    "loader_eval_batches",
    "sample_shape",
]
