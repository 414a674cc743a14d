"""Copy and Repeat Copy (Graves et al. 2014, as set in Jaderberg et al. 2016, section 3.1), and
the curriculum that lengthens them.

One episode, per sample: N random characters from an alphabet of A, then a marker, then blanks
while the model writes. Copy: the model writes the N characters back, then a stop character.
Repeat Copy: the marker also says how many times R (1..repeats) to write them, then stop.

Inputs are one-hot over A characters, a copy marker, ``repeats`` repeat markers and a blank;
outputs over A characters and stop. Only the writing steps count in the loss and the error.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

LN2 = 0.6931471805599453


@dataclass(frozen=True)
class Episode:
    """x (L, B, inputs) one-hot float; y (L, B) int64 output classes; mask (L, B) bool."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor


class CopyTask:
    """Episodes of Copy (``repeats == 0``) or Repeat Copy (``repeats >= 1``: R in 1..repeats)."""

    def __init__(self, alphabet: int, repeats: int = 0) -> None:
        if alphabet < 2:
            raise ValueError(f"the alphabet needs at least 2 characters, got {alphabet}")
        self.alphabet, self.repeats = alphabet, repeats
        self.blank = alphabet + 1 + max(repeats, 1)
        self.inputs = self.blank + 1
        self.stop = alphabet
        self.outputs = alphabet + 1

    def episode(self, length: int, batch: int, generator: torch.Generator) -> Episode:
        """One batch of episodes of ``length`` characters; in Repeat Copy one R for the batch,
        so that every sample has the same number of steps."""
        chars = torch.randint(0, self.alphabet, (length, batch), generator=generator)
        times = 1
        if self.repeats:
            times = int(torch.randint(1, self.repeats + 1, (1,), generator=generator))
        marker = self.alphabet + (times - 1 if self.repeats else 0)
        written = times * length + 1  # the copies, then stop
        steps = length + 1 + written
        inputs = torch.full((steps, batch), self.blank)
        inputs[:length] = chars
        inputs[length] = marker
        y = torch.zeros((steps, batch), dtype=torch.long)
        y[length + 1 : steps - 1] = chars.repeat(times, 1)
        y[steps - 1] = self.stop
        mask = torch.zeros((steps, batch), dtype=torch.bool)
        mask[length + 1 :] = True
        return Episode(F.one_hot(inputs, self.inputs).float(), y, mask)


class Curriculum:
    """The paper's curriculum: the length N goes up by one whenever the error, in bits per written
    character averaged over the last ``window`` episodes, falls below ``threshold`` bits.

    ``solved`` is the longest length whose error fell below the threshold (0: none yet)."""

    def __init__(self, start: int, threshold_bits: float, window: int, max_length: int) -> None:
        self.length, self.threshold, self.max_length = start, threshold_bits, max_length
        self.solved = 0
        self._recent: deque[float] = deque(maxlen=window)

    def record(self, loss_nats: float, counted: int) -> bool:
        """Adds one episode's summed loss; returns True when the length was raised."""
        self._recent.append(loss_nats / LN2 / max(counted, 1))
        if len(self._recent) < (self._recent.maxlen or 1) or self.error >= self.threshold:
            return False
        self.solved = self.length
        if self.length >= self.max_length:
            return False
        self.length += 1
        self._recent.clear()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"length": self.length, "solved": self.solved, "recent": list(self._recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.length, self.solved = int(state["length"]), int(state["solved"])
        self._recent = deque(state["recent"], maxlen=self._recent.maxlen)

    @property
    def error(self) -> float:
        """Bits per written character over the window (inf before the first episode)."""
        return sum(self._recent) / len(self._recent) if self._recent else float("inf")
