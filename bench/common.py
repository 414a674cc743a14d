"""What the benchmarks share: how busy the machine is, waiting for it to be quiet, and the
steady-state rate of a run.

On a small shared machine other processes can take a core from a benchmark; every measurement
records how busy the CPUs were just before it, and ``wait_quiet`` holds a run back until they
are (mostly) idle, so a figure is not silently a measurement of somebody else's test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

from decoupled.metrics import STEADY_FROM, steady_samples_per_s

__all__ = [
    "STEADY_FROM",
    "add_model_args",
    "cell",
    "cpu_busy",
    "machine",
    "steady_rate",
    "wait_quiet",
]


def _cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) jiffies over all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over the next ``seconds`` (0..1); -1 where /proc is missing."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(seconds)
        idle1, total1 = _cpu_times()
    except OSError:
        return -1.0
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_quiet(max_busy: float, timeout_s: float) -> float:
    """Wait (up to ``timeout_s``) until the CPUs are at most ``max_busy`` busy; the last reading.

    ``max_busy`` >= 1 disables the wait (one reading is still taken).
    """
    deadline = time.monotonic() + timeout_s
    busy = cpu_busy()
    while max_busy < 1.0 and busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return busy


def machine() -> dict[str, Any]:
    """CPU model and count, load averages, Python, torch, Ray and CUDA versions, GPU models."""
    import ray
    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "cuda": torch.version.cuda,  # None for a CPU build of torch
        "gpus": [
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        ],  # empty without a CUDA device
    }


def steady_rate(records: list[dict[str, Any]], total_steps: int, batch: int) -> float:
    """``summary.json``'s steady_samples_per_s, from ``metrics.jsonl`` records; raises when the
    run logged too few of them."""
    progress = [(r["step"], r["wall_s"]) for r in records if r.get("event") == "train"]
    rate = steady_samples_per_s(progress, 0, total_steps, batch)
    if rate is None:
        raise RuntimeError("too few progress records: raise --steps")
    return rate


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The throughput model every compute benchmark shares: an 8x1024 FCN, batch 256, 4
    micro-batches for the pipelined schedules, and the K values and steps of a run."""
    p.add_argument("--stages", type=int, nargs="+", default=[2], help="K values (default: 2)")
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--layers", type=int, default=8, help="model.layers")
    p.add_argument("--hidden", type=int, default=1024, help="model.hidden")
    p.add_argument("--batch", type=int, default=256, help="data.batch_size")
    p.add_argument("--micro-batches", type=int, default=4, help="method.micro_batches")


def cell(value: float | None, spec: str) -> str:
    """A table cell; "-" for a figure a case does not have."""
    return "-" if value is None else format(value, spec)
