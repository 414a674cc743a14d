"""Ctrl-C and SIGTERM as a request: save a cut at the next step boundary, then stop.

A signal can arrive in the middle of a step, when the stages are not at one consistent step.
So the handler only records the request; the trainers look at it between steps, write a
checkpoint and raise ``Interrupted``. A second signal raises KeyboardInterrupt at once, for a
run that does not get to a boundary.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Interrupted(Exception):
    """The run stopped on a signal after saving what it could."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"; checkpoint at {checkpoint}" if checkpoint else "; no checkpoint written"
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}{where}")


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Route SIGINT and SIGTERM here while the run lasts (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
