"""The Ray data plane: messages travel as actor calls through the object store.

Works everywhere Ray does, across nodes, with no set-up. The sender keeps at most ``capacity``
calls in flight (``ray.wait`` on the oldest before sending more), and the receiving actor puts
what arrives into a bounded ``LocalChannel``: the forward direction blocks when full
(backpressure), the backward direction drops its oldest target.

A threaded actor runs calls concurrently, so Ray does not keep their order; each edge numbers
its deliveries and the ``OrderedInbox`` releases them strictly in that order.
"""

from __future__ import annotations

import collections
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from decoupled.channel import BackwardMessage, ForwardMessage, Kind, LocalChannel, Message, Policy

# The receiving stage maps activations and targets straight from the object store (read-only,
# see ``_WireTensor``): it only reads them, so the copy torch would make is not needed.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@dataclass(frozen=True)
class _WireTensor:
    """A tensor as the object store carries it: its bytes as a flat uint8 numpy array.

    Pickle 5 ships numpy buffers out of band, so Ray writes the bytes into the object store
    once and the receiver reads them in place; a pickled torch tensor is copied on both ends.
    """

    data: np.ndarray  # (nbytes,) uint8
    dtype: torch.dtype
    shape: tuple[int, ...]

    @staticmethod
    def pack(tensor: torch.Tensor) -> _WireTensor:
        # CUDA tensors travel as host memory (GPU -> CPU -> GPU): the receiving stage moves
        # them to its own device.
        host = tensor.detach().cpu().contiguous()
        return _WireTensor(host.reshape(-1).view(torch.uint8).numpy(), host.dtype, host.shape)

    def unpack(self, copy: bool = False) -> torch.Tensor:
        """The tensor; read-only memory of the object store unless ``copy``."""
        tensor = torch.from_numpy(self.data).view(self.dtype).reshape(self.shape)
        return tensor.clone() if copy else tensor


@dataclass(frozen=True)
class WireMessage:
    """A ``Message`` on its way: seq and kind as they are, the tensors as ``_WireTensor``."""

    forward: bool
    seq: int
    kind: Kind
    payload: _WireTensor
    labels: _WireTensor | None

    @staticmethod
    def pack(message: Message) -> WireMessage:
        if isinstance(message, ForwardMessage):
            return WireMessage(
                True,
                message.seq,
                message.kind,
                _WireTensor.pack(message.activations),
                _WireTensor.pack(message.labels),
            )
        return WireMessage(False, message.seq, message.kind, _WireTensor.pack(message.target), None)

    def unpack(self) -> Message:
        if not self.forward:
            return BackwardMessage(self.seq, self.payload.unpack(), self.kind)
        assert self.labels is not None
        # Labels are copied: a stage keeps them in its history for many steps, and a view
        # would pin the whole message (activations included) in the object store meanwhile.
        return ForwardMessage(
            self.seq, self.kind, self.payload.unpack(), self.labels.unpack(copy=True)
        )


class RaySender:
    """Sends to ``method`` (``deliver_forward``/``deliver_backward``) of the neighbour actor."""

    def __init__(self, actor: Any, method: str, capacity: int) -> None:
        self._call = getattr(actor, method)
        self.capacity = capacity
        self._next = 0
        self._in_flight: collections.deque[Any] = collections.deque()

    def send(self, message: Message, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._in_flight) >= self.capacity:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait([self._in_flight[0]], timeout=remaining)
            if not ready:
                raise TimeoutError(f"neighbour accepted nothing for {timeout}s")
            ray.get(self._in_flight.popleft())  # surfaces the neighbour's death here
        self._in_flight.append(self._call.remote(self._next, WireMessage.pack(message)))
        self._next += 1

    def close(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for what is in flight, so the last messages are not lost."""
        if self._in_flight:
            ray.wait(list(self._in_flight), num_returns=len(self._in_flight), timeout=timeout)
            self._in_flight.clear()


class OrderedInbox:
    """Receiving end of one edge: deliveries numbered 0, 1, 2... enter ``channel`` in order."""

    def __init__(self, capacity: int, policy: Policy) -> None:
        self.channel = LocalChannel(capacity, policy)
        self._next = 0
        self._turn = threading.Condition()

    def deliver(self, number: int, wire: WireMessage, timeout: float) -> None:
        message = wire.unpack()
        with self._turn:
            if not self._turn.wait_for(lambda: self._next == number, timeout):
                raise TimeoutError(f"delivery {self._next} never arrived (waited in {number})")
            try:
                self.channel.send(message, timeout=timeout)
            finally:
                self._next += 1
                self._turn.notify_all()
