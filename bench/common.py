"""What the benchmarks share: how busy the machine is, waiting for it to be quiet, the
steady-state rate of a run, and running a grid of in-process runs in worker processes.

On a small shared machine other processes can take a core from a benchmark; every measurement
records how busy the CPUs were just before it, and ``wait_quiet`` holds a run back until they
are (mostly) idle, so a figure is not silently a measurement of somebody else's test suite.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from decoupled.config import Config
from decoupled.data import Dataset, load_dataset
from decoupled.metrics import STEADY_FROM, steady_samples_per_s

__all__ = [
    "STEADY_FROM",
    "add_model_args",
    "cell",
    "cpu_busy",
    "loaded",
    "machine",
    "preload",
    "run_grid",
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
    import torch

    try:
        import ray

        ray_version: str | None = ray.__version__
    except ImportError:  # the in-process benchmarks run where Ray is not installed too
        ray_version = None
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
        "ray": ray_version,
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


Key = TypeVar("Key", bound=Hashable)
Result = TypeVar("Result")
_LOADED: dict[str, Dataset] = {}  # per process: each worker loads a dataset once


def loaded(cfg: Config) -> Dataset:
    """``cfg``'s dataset, loaded once per process (``preload`` seeds it in the parent)."""
    if cfg.data.name not in _LOADED:
        _LOADED[cfg.data.name] = load_dataset(cfg.data)
    return _LOADED[cfg.data.name]


def preload(dataset: Dataset) -> None:
    _LOADED[dataset.name] = dataset


def _grid_task(
    run: Callable[[Key, Config, Dataset], Result], key: Key, cfg: Config
) -> tuple[Key, Result]:
    import torch

    torch.set_num_threads(1)  # one thread per run, as in a serial grid and in each actor
    return key, run(key, cfg, loaded(cfg))


def run_grid(
    configs: dict[Key, Config], run: Callable[[Key, Config, Dataset], Result], jobs: int
) -> dict[Key, Result]:
    """``run(key, cfg, dataset)`` for every entry, ``jobs`` at a time in worker processes (1: in
    this process). ``run`` must be a module-level function (it is pickled). In-process runs are
    deterministic for their seed, so the results do not depend on ``jobs``."""
    if jobs <= 1:
        return dict(_grid_task(run, key, cfg) for key, cfg in configs.items())
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(_grid_task, run, key, cfg) for key, cfg in configs.items()]
        return dict(f.result() for f in concurrent.futures.as_completed(futures))
