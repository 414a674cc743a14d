"""Messages between stages and the channel interface every data plane implements.

An edge between stage i and stage i+1 carries two directions:
- forward ``(seq, activations, labels)``: bounded, a full channel blocks the producer
  (backpressure keeps memory flat and the fast stage from running away);
- backward ``(seq, target)``: bounded too, but a full channel drops its *oldest* message and
  counts it, so a slow consumer of targets can never stall the stage that produces them. A stale
  target is worth less than a fresh one, so dropping the oldest is also the right loss.

The in-process form here (``LocalChannel``) is what the local trainer and the unit tests use; the
Ray and torch.distributed planes implement the same ``send``/``recv`` under ``ray_runtime/``.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch


class Kind(enum.IntEnum):
    TRAIN = 0  # a training batch: update, then pass on
    EVAL = 1  # an evaluation batch: forward only, no update, no target
    STOP = 2  # end of stream: the receiver finishes what it has and stops
    # A checkpoint marker for step ``seq``: every stage saves its state when the marker reaches it,
    # i.e. after its own step seq - 1 and before step seq, so the saved states form one cut.
    CHECKPOINT = 3
    # The synthetic-gradient probe (``method.sg.probe_every``): forward, every stage keeps its
    # graph (no update); backward, the exact gradient of the loss at each boundary comes back.
    PROBE = 4


@dataclass
class ForwardMessage:
    """Activations of stage i for step ``seq``.

    activations: (B, ...) the output h_i of stage i, detached (the raw inputs for stage 0).
    labels: (B,) int64 class indices, or (B, T) next-token ids for text; they travel with the
    activations because the last stage needs them for the loss and cDNI synthesizers are
    conditioned on them.
    """

    seq: int
    kind: Kind
    activations: torch.Tensor
    labels: torch.Tensor


@dataclass
class BackwardMessage:
    """Target for stage i's synthesizer for step ``seq``: g_i, shaped like h_i, (B, ...).
    ``kind`` PROBE: the exact ∂L/∂h_i of the probe batch ``seq`` instead."""

    seq: int
    target: torch.Tensor
    kind: Kind = Kind.TRAIN


Message = ForwardMessage | BackwardMessage


class Policy(enum.Enum):
    BLOCK = "block"  # a full channel blocks the sender (forward direction)
    DROP_OLDEST = "drop_oldest"  # a full channel evicts its oldest message (backward direction)


class ChannelClosed(Exception):
    """The other end is gone: the channel was closed while waiting on it."""


class Sender(Protocol):
    def send(self, message: Message, timeout: float | None = None) -> None:
        """Deliver ``message``; with Policy.BLOCK, wait while full (TimeoutError after timeout)."""
        ...


class Receiver(Protocol):
    def recv(self, timeout: float | None = None) -> Message | None:
        """Next message in order, or None when nothing arrived within ``timeout`` seconds."""
        ...

    def depth(self) -> int:
        """Messages waiting to be received (a figure for the stats, not for decisions)."""
        ...


class LocalChannel:
    """A bounded in-process channel, safe between threads. Implements Sender and Receiver."""

    def __init__(self, capacity: int, policy: Policy) -> None:
        if capacity < 1:
            raise ValueError(f"channel capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        self.dropped = 0
        self._items: collections.deque[Message] = collections.deque()
        self._closed = False
        self._cond = threading.Condition()

    def send(self, message: Message, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._items) >= self.capacity and not self._closed:
                if self.policy is Policy.DROP_OLDEST:
                    self._items.popleft()
                    self.dropped += 1
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"channel full for {timeout}s (capacity {self.capacity})")
                self._cond.wait(remaining)
            if self._closed:
                raise ChannelClosed("send on a closed channel")
            self._items.append(message)
            self._cond.notify_all()

    def recv(self, timeout: float | None = None) -> Message | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:
                    raise ChannelClosed("recv on a closed, empty channel")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            message = self._items.popleft()
            self._cond.notify_all()
            return message

    def depth(self) -> int:
        with self._cond:
            return len(self._items)

    def close(self) -> None:
        """Wake every waiter; later sends raise, receives drain what is left then raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class DelayLine:
    """The in-process trainer's backward channel: a message sent during step s can be received
    once step s + ``delay`` is done, in the order sent. ``delay`` is what the asynchronous
    protocol's lateness is made of when every stage runs in one process (``method.delay``)."""

    def __init__(self, delay: int) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        self.delay = delay
        self._items: collections.deque[tuple[int, int, BackwardMessage]] = collections.deque()

    def send(self, step: int, to_stage: int, message: BackwardMessage) -> None:
        self._items.append((step + self.delay, to_stage, message))

    def due(self, step: int) -> tuple[int, BackwardMessage] | None:
        """The oldest message receivable after step ``step`` as (stage, message), or None."""
        if self._items and self._items[0][0] <= step:
            _, to_stage, message = self._items.popleft()
            return to_stage, message
        return None
