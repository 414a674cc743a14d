"""Activations kept until their synthetic-gradient target arrives, keyed by step (``seq``).

Stage i needs h_i (and the labels, for cDNI) again when the target g_i for that step comes back
from stage i+1, possibly many steps later. The history is bounded so memory stays flat however
late targets are: when full, the oldest entry is evicted, and a target that arrives for an
evicted (or never seen) step is counted as expired rather than used.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch


class Entry(NamedTuple):
    activations: torch.Tensor  # (B, ...) h_i, detached
    labels: torch.Tensor  # (B,) int64


class ActivationHistory:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"history capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[int, Entry] = OrderedDict()

    def put(self, seq: int, activations: torch.Tensor, labels: torch.Tensor) -> None:
        self._entries[seq] = Entry(activations, labels)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def pop(self, seq: int) -> Entry | None:
        """The entry for ``seq``, removed; None when it was evicted or never stored."""
        return self._entries.pop(seq, None)

    def items(self) -> list[tuple[int, Entry]]:
        """Every (seq, entry), oldest first (what a checkpoint keeps)."""
        return list(self._entries.items())

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
