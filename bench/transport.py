"""One-way per-message cost and bandwidth of the data planes, against raw torch.distributed.

Modes, each moving float32 tensors of shape (size / 4 KB, 1024) from a producer to a consumer:

- ``raw``: blocking ``dist.send``/``dist.recv`` (gloo) between two processes, one tensor a message;
- ``torch``: the project's channel, ``TorchSender`` -> ``TorchReceiver`` (capacity 4, one message
  in flight) after ``open_process_group``, carrying ``ForwardMessage``s with (rows,) int64 labels,
  as the stage actors do;
- ``ray``: ``RaySender`` in one actor -> ``deliver_forward`` of another actor holding an
  ``OrderedInbox`` drained by a consumer thread, wired like ``decoupled/ray_runtime/actor.py``;
- ``ray-zc``: the same with ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` (not what the library sets).

One repetition: the producer sends N messages, the consumer receives N; the time from the first
send to the last receive (both read from the host's monotonic clock), divided by N, is the
per-message cost. The median over repetitions is reported, after one discarded warm-up.

    .venv/bin/python bench/transport.py                          # 64K 1M 4M 16M, 5 repeats
    .venv/bin/python bench/transport.py --sizes 1M 64M --repeats 7 --json runs/bench/tr.json
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import threading
import time
from typing import Any

import ray
import torch
import torch.distributed as dist

from decoupled.channel import ForwardMessage, Kind, Policy
from decoupled.ray_runtime.transport_ray import OrderedInbox, RaySender
from decoupled.ray_runtime.transport_torch import (
    TorchReceiver,
    TorchSender,
    close_process_group,
    free_port,
    open_process_group,
)

CAPACITY = 4  # runtime.channel_capacity's default
ROW_BYTES = 1024 * 4  # one row of the (rows, 1024) float32 payload
Plan = list[tuple[int, int]]  # (bytes, messages per repetition)
Result = tuple[str, int, int, float]  # (mode, bytes, repetition, seconds per message)


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    scale = units.get(text[-1].upper(), 1)
    size = int(float(text[:-1] if text[-1].upper() in units else text) * scale)
    if size < ROW_BYTES or size % ROW_BYTES:
        raise argparse.ArgumentTypeError(f"size must be a multiple of {ROW_BYTES} bytes: {text}")
    return size


def payload(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = size // ROW_BYTES
    return torch.randn(rows, 1024), torch.randint(0, 10, (rows,))


# --- torch.distributed: two plain processes ------------------------------------------------------
def torch_worker(rank: int, mode: str, port: int, plan: Plan, repeats: int, out: Any) -> None:
    torch.set_num_threads(1)
    if mode == "raw":
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
        )
    else:
        open_process_group(rank, 2, "127.0.0.1", port, "gloo", 60.0)
    cpu = torch.device("cpu")
    sender = TorchSender(1, "forward", cpu) if mode == "torch" and rank == 0 else None
    receiver = (
        TorchReceiver(0, "forward", CAPACITY, Policy.BLOCK, cpu)
        if mode == "torch" and rank == 1
        else None
    )
    for size, n in plan:
        x, labels = payload(size)
        buffer = torch.empty_like(x)
        for rep in range(repeats + 1):  # repetition 0 is a warm-up
            dist.barrier()
            if rank == 0:
                out.put(("t0", size, rep, time.monotonic()))  # CLOCK_MONOTONIC: host-wide
                for i in range(n):
                    if sender is not None:
                        sender.send(ForwardMessage(i, Kind.TRAIN, x, labels), timeout=60.0)
                    else:
                        dist.send(x, 1)
            else:
                for _ in range(n):
                    if receiver is not None:
                        if receiver.recv(timeout=60.0) is None:
                            raise TimeoutError("no message within 60 s")
                    else:
                        dist.recv(buffer, 0)
                out.put(("t1", size, rep, time.monotonic()))
    if sender is not None:
        sender.close()
    dist.barrier()
    if receiver is not None:
        receiver.close()
    close_process_group()


def run_torch(mode: str, plan: Plan, repeats: int) -> list[Result]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=torch_worker, args=(rank, mode, port, plan, repeats, out))
        for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    stamps: dict[tuple[str, int, int], float] = {}
    for _ in range(2 * len(plan) * (repeats + 1)):
        kind, size, rep, t = out.get(timeout=600)
        stamps[kind, size, rep] = t
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"{mode} worker exited with {p.exitcode}")
    return [
        (mode, size, rep, (stamps["t1", size, rep] - stamps["t0", size, rep]) / n)
        for size, n in plan
        for rep in range(1, repeats + 1)
    ]


# --- Ray: two actors, as the stage actors are wired ----------------------------------------------
class Consumer:
    """The receiving half of ``StageActor``: ``deliver_forward`` into an ``OrderedInbox``."""

    def __init__(self) -> None:
        self.inbox = OrderedInbox(CAPACITY, Policy.BLOCK)
        self.thread: threading.Thread | None = None
        self.last = 0.0

    def deliver_forward(self, number: int, message: ForwardMessage) -> None:
        self.inbox.deliver(number, message, 60.0)

    def expect(self, n: int) -> None:
        def drain() -> None:
            for _ in range(n):
                if self.inbox.channel.recv(timeout=60.0) is None:
                    raise TimeoutError("no message within 60 s")
            self.last = time.monotonic()

        self.thread = threading.Thread(target=drain, daemon=True)
        self.thread.start()

    def finished(self) -> float:
        assert self.thread is not None
        self.thread.join()
        return self.last


class Producer:
    """The sending half of ``StageActor``: a ``RaySender`` to the consumer's deliver_forward."""

    def __init__(self, consumer: Any) -> None:
        self.sender = RaySender(consumer, "deliver_forward", CAPACITY)
        self.x, self.labels = payload(ROW_BYTES)

    def prepare(self, size: int) -> None:
        self.x, self.labels = payload(size)

    def send(self, n: int) -> float:
        start = time.monotonic()
        for i in range(n):
            self.sender.send(ForwardMessage(i, Kind.TRAIN, self.x, self.labels), timeout=60.0)
        return start


def run_ray(mode: str, plan: Plan, repeats: int) -> list[Result]:
    zero_copy = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"} if mode == "ray-zc" else {}
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": zero_copy},
    )
    try:
        concurrency = 2 * CAPACITY + 2 * 4 + 4  # as the controller sets it for micro_batches=4
        # Any: Ray's stubs do not know that actor methods grow a ``.remote``.
        consumer: Any = ray.remote(Consumer).options(num_cpus=1, max_concurrency=concurrency)
        consumer = consumer.remote()
        producer: Any = ray.remote(Producer).options(num_cpus=1, max_concurrency=2)
        producer = producer.remote(consumer)
        results: list[Result] = []
        for size, n in plan:
            ray.get(producer.prepare.remote(size), timeout=60)
            for rep in range(repeats + 1):
                ray.get(consumer.expect.remote(n), timeout=60)
                start = float(ray.get(producer.send.remote(n), timeout=600))
                end = float(ray.get(consumer.finished.remote(), timeout=600))
                if rep:
                    results.append((mode, size, rep, (end - start) / n))
        return results
    finally:
        ray.shutdown()


# --- report --------------------------------------------------------------------------------------
def summarise(results: list[Result], modes: list[str], plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for size, n in plan:
        raw = [r[3] for r in results if r[0] == "raw" and r[1] == size]
        base = statistics.median(raw) if raw else None
        for mode in modes:
            per = [r[3] for r in results if r[0] == mode and r[1] == size]
            median = statistics.median(per)
            rows.append(
                {
                    "mode": mode,
                    "bytes": size,
                    "messages": n,
                    "us_per_message": 1e6 * median,
                    "us_min": 1e6 * min(per),
                    "us_max": 1e6 * max(per),
                    "mb_per_s": size / median / 2**20,
                    "ratio_to_raw": median / base if base else None,
                    "runs_s": per,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | mode | messages | us/message (median) | min - max | MB/s | x raw |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        size = f"{r['bytes'] / 2**20:g} MB" if r["bytes"] >= 2**20 else f"{r['bytes'] >> 10} KB"
        ratio = f"{r['ratio_to_raw']:.2f}" if r["ratio_to_raw"] else "-"
        lines.append(
            f"| {size} | {r['mode']} | {r['messages']} | {r['us_per_message']:.0f} | "
            f"{r['us_min']:.0f} - {r['us_max']:.0f} | {r['mb_per_s']:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sizes = [2**16, 2**20, 2**22, 2**24]  # 64K 1M 4M 16M
    p.add_argument("--sizes", type=parse_size, nargs="+", default=sizes, help="e.g. 64K 1M 64M")
    p.add_argument("--modes", nargs="+", default=["raw", "torch", "ray", "ray-zc"])
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (+1 warm-up)")
    p.add_argument("--bytes-per-rep", type=parse_size, default=2**26, help="N = this / size")
    p.add_argument("--min-messages", type=int, default=8)
    p.add_argument("--max-messages", type=int, default=200)
    p.add_argument("--json", help="write the table rows and every repetition here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    plan: Plan = [
        (size, max(args.min_messages, min(args.max_messages, args.bytes_per_rep // size)))
        for size in args.sizes
    ]
    results: list[Result] = []
    loads: dict[str, float] = {}
    for mode in args.modes:
        loads[mode] = os.getloadavg()[0]  # other work on the machine skews every figure
        started = time.perf_counter()
        if mode in ("raw", "torch"):
            results += run_torch(mode, plan, args.repeats)
        elif mode in ("ray", "ray-zc"):
            results += run_ray(mode, plan, args.repeats)
        else:
            raise SystemExit(f"unknown mode {mode!r}: raw, torch, ray, ray-zc")
        elapsed = time.perf_counter() - started
        print(f"{mode}: done in {elapsed:.1f}s (load at start {loads[mode]:.2f})", flush=True)
    rows = summarise(results, args.modes, plan)
    print(f"\nOne-way cost per message, median of {args.repeats} repeats, {os.cpu_count()} CPUs")
    print(markdown(rows))
    if args.json:
        meta: dict[str, Any] = {"torch": torch.__version__, "ray": ray.__version__}
        meta |= {"cpus": os.cpu_count(), "load1_at_mode_start": loads}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
