"""Your own map-style torch Dataset, with random transforms, read by step in stage 0.

``data.name`` names a function returning ``MapData(train, test, num_classes)`` of torch
Datasets (``__len__``/``__getitem__`` giving ``(x, label)``). Stage 0 reads batch t through a
DataLoader with ``data.workers`` processes; the sample indices of step t and the random state
of every sample's transform depend only on (seed, step, position), so a resumed run sees the
batches the uninterrupted run saw, with any number of workers.

Here the samples are the handwritten digits shipped with the package (or Fashion-MNIST's
IDX files in ``data.root``, with ``fashion`` as the first argument), padded and randomly
cropped (and, for clothes, flipped) on the fly; torchvision is not needed. The arrays are
read lazily, on first access, in the process that reads samples: the driver of a Ray run
only calls ``len`` (``input_shape`` spares it reading a sample).

    .venv/bin/python examples/custom_dataset.py                        # digits, in-process
    .venv/bin/python examples/custom_dataset.py data.workers=2 runtime.backend=ray
    .venv/bin/python examples/custom_dataset.py fashion data.root=data/fashion_mnist
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import decoupled
from decoupled.config import DataConfig
from decoupled.data import load_dataset
from decoupled.loader import MapData

Arrays = tuple[torch.Tensor, torch.Tensor]  # images (N, C, H, W) float32, labels (N,) int64


class Augmented(Dataset[tuple[torch.Tensor, int]]):
    """Images with a random crop of ``pad`` pixels each way (and a horizontal flip if
    ``flip``) at training time; ``train=False`` returns them as they are."""

    def __init__(
        self, load: Callable[[], Arrays], size: int, pad: int, flip: bool, train: bool
    ) -> None:
        self.load, self.size = load, size
        self.pad, self.flip, self.train = pad, flip, train
        self._arrays: Arrays | None = None  # read on first access, where samples are read

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._arrays is None:
            self._arrays = self.load()
        images, labels = self._arrays
        x = images[index]
        if self.train:
            # torch's global RNG: seeded per sample from (seed, step, position) by the loader.
            h, w = x.shape[-2:]
            padded = F.pad(x, (self.pad,) * 4)
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = padded[..., top : top + h, left : left + w]
            if self.flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, int(labels[index])


def _split(name: str, root: str, train: bool) -> Callable[[], Arrays]:
    def load() -> Arrays:
        data = load_dataset(DataConfig(name=name, root=root))  # standardised tensors
        return (data.train_x, data.train_y) if train else (data.test_x, data.test_y)

    return load


def _map_data(
    name: str, cfg: DataConfig, sizes: tuple[int, int], shape: tuple[int, ...]
) -> MapData:
    flip = name == "fashion_mnist"  # a mirrored shirt is a shirt; a mirrored 3 is not a 3
    return MapData(
        train=Augmented(_split(name, cfg.root, True), sizes[0], pad=1, flip=flip, train=True),
        test=Augmented(_split(name, cfg.root, False), sizes[1], pad=1, flip=flip, train=False),
        num_classes=10,
        input_shape=shape,
    )


def digits(cfg: DataConfig) -> MapData:
    """The shipped 8x8 digits (1438 train, 359 test), randomly cropped."""
    return _map_data("digits", cfg, (1438, 359), (1, 8, 8))


def fashion(cfg: DataConfig) -> MapData:
    """Fashion-MNIST from ``data.root`` (60,000 train, 10,000 test), cropped and flipped."""
    return _map_data("fashion_mnist", cfg, (60_000, 10_000), (1, 28, 28))


def main(args: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))  # so that "custom_dataset:..." imports
    which = args.pop(0) if args and "=" not in args[0] else "digits"
    summary = decoupled.train(
        {
            "stages": 2,
            "model": {"name": "fcn", "layers": 3, "hidden": 128},
            "data": {"name": f"custom_dataset:{which}", "batch_size": 64},
            "method": {"name": "cdni"},
            "train": {"epochs": 5, "progress": False},
            "runtime": {"backend": "local"},
        },
        args,
        out="runs/custom-dataset",
        overwrite=True,
    )
    print(f"{summary['method']}: test accuracy {summary['test_accuracy']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
