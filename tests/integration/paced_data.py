"""The shipped digits as a map-style Dataset that stage 0 reads slowly while a marker file
exists: a run the test can interrupt at a step of its choosing, with room to spare before the
end, whatever the machine's speed; without the marker the same run reads at full speed (the
batches do not depend on the pace)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from decoupled.config import DataConfig
from decoupled.data import load_dataset
from decoupled.loader import MapData

MARKER = "paced"  # in data.root: while it exists, every training sample costs ITEM_S
ITEM_S = 0.0003  # ~20 ms for a batch of 64: ~50 steps/s


class _Paced(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, root: str, train: bool) -> None:
        self.marker, self.train = Path(root) / MARKER, train
        data = load_dataset(DataConfig(name="digits"))
        self.x, self.y = (data.train_x, data.train_y) if train else (data.test_x, data.test_y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.train and self.marker.exists():
            time.sleep(ITEM_S)
        return self.x[index], int(self.y[index])


def digits(cfg: DataConfig) -> MapData:
    """Pass ``data.root`` a folder of the test's; create ``<root>/paced`` to slow the run."""
    return MapData(
        train=_Paced(cfg.root, train=True),
        test=_Paced(cfg.root, train=False),
        num_classes=10,
        input_shape=(1, 8, 8),
    )
