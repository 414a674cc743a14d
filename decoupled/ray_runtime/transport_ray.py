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
from typing import Any

import ray

from decoupled.channel import BackwardMessage, ForwardMessage, LocalChannel, Message, Policy


def _to_host(message: Message) -> Message:
    # CUDA tensors go through the object store as host memory (GPU -> CPU -> GPU); the
    # receiving stage moves them to its own device.
    if isinstance(message, ForwardMessage):
        return ForwardMessage(
            message.seq, message.kind, message.activations.cpu(), message.labels.cpu()
        )
    return BackwardMessage(message.seq, message.target.cpu())


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
        self._in_flight.append(self._call.remote(self._next, _to_host(message)))
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

    def deliver(self, number: int, message: Message, timeout: float) -> None:
        with self._turn:
            if not self._turn.wait_for(lambda: self._next == number, timeout):
                raise TimeoutError(f"delivery {self._next} never arrived (waited in {number})")
            try:
                self.channel.send(message, timeout=timeout)
            finally:
                self._next += 1
                self._turn.notify_all()
