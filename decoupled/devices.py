"""A stage's GPU figures: the memory this process holds and the device's utilisation.

``gpu_util`` comes from NVML (``nvidia-ml-py``, a dependency) and describes the whole device:
stages that share a GPU all report the same figure, the device's, not their own part of it.
Memory (``gpu_mem_mb``, ``gpu_max_mem_mb``) is this process's own, from torch's allocator.

NVML is asked on every call, because a failure can be passing (a driver busy with a reset, a
sampling error). The policy:
- ``nvidia-ml-py`` not importable: utilisation is left out for the rest of the process (a module
  does not appear while it runs);
- any other error leaves the figure out of that call only; after ``FAILURES_BEFORE_BACKOFF``
  failures in a row it is asked at most once every ``BACKOFF_S`` seconds, so a broken NVML
  costs one failed query a minute rather than one per poll; a success resets both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

import torch

log = logging.getLogger(__name__)

FAILURES_BEFORE_BACKOFF: Final = 3
BACKOFF_S: Final = 60.0


def _nvml_utilization(device: torch.device) -> float:
    """% of the last sample period in which a kernel ran on ``device`` (the whole device)."""
    # torch maps the index through CUDA_VISIBLE_DEVICES (set per actor by Ray) to NVML's.
    return float(torch.cuda.utilization(device))


class UtilizationProbe:
    """Asks ``query`` for a device's utilisation under the module's failure policy.

    ``query`` and ``clock`` are the boundaries (NVML, time), replaceable in tests."""

    def __init__(
        self,
        query: Callable[[torch.device], float] = _nvml_utilization,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._query = query
        self._clock = clock
        self._lock = threading.Lock()  # polls may come from several of Ray's threads
        self._missing = False
        self._failures = 0
        self._next_try = 0.0

    def __call__(self, device: torch.device) -> float | None:
        """The utilisation (%), or None when it is not to be had this time."""
        with self._lock:
            if self._missing or (
                self._failures >= FAILURES_BEFORE_BACKOFF and self._clock() < self._next_try
            ):
                return None
            try:
                value = self._query(device)
            except ModuleNotFoundError as error:
                self._missing = True
                log.warning("gpu_util is not reported: %s", error)
                return None
            except Exception as error:
                self._failures += 1
                if self._failures == FAILURES_BEFORE_BACKOFF:
                    log.warning(
                        "gpu_util: NVML failed %d times in a row (%s); asking once every %gs",
                        self._failures,
                        error,
                        BACKOFF_S,
                    )
                if self._failures >= FAILURES_BEFORE_BACKOFF:
                    self._next_try = self._clock() + BACKOFF_S
                return None
            self._failures = 0
            return value


_utilization = UtilizationProbe()


def gpu_figures(
    device: torch.device, utilization: UtilizationProbe = _utilization
) -> dict[str, float]:
    """Memory this process holds on ``device`` (MB, now and peak) and the whole device's
    utilisation (%, over the driver's last sample period) when NVML answers."""
    figures = {
        "gpu_mem_mb": torch.cuda.memory_allocated(device) / 2**20,
        "gpu_max_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20,
    }
    util = utilization(device)
    if util is not None:
        figures["gpu_util"] = util
    return figures
