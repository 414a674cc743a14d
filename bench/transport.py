"""One-way per-message cost and bandwidth of the data planes, against raw torch.distributed.

Modes, each moving float32 tensors of shape (size / 4 KB, 1024) from a producer to a consumer:

- ``raw``: blocking ``dist.send``/``dist.recv`` (gloo) between two processes, one tensor a message;
- ``raw-async``: ``dist.isend``/``dist.irecv`` with two sends in flight and two receives posted
  ahead (what raw gloo does when messages stream; "x best raw" is to the faster raw mode);
- ``torch``: the project's channel, ``TorchSender`` -> ``TorchReceiver`` after
  ``open_process_group``, carrying ``ForwardMessage``s with (rows,) int64 labels; default channel
  capacity and one message in flight, as the stage actors use it;
- ``torch-if2``: the same with ``max_in_flight=2`` (not what the actors use);
- ``ray``: ``RaySender`` in one actor -> ``deliver_forward`` of another actor holding an
  ``OrderedInbox`` drained by a consumer thread, wired like ``decoupled/ray_runtime/actor.py``;
- ``ray-zc``: the same with ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` (not what the library sets).

CUDA modes (need a GPU; not in the default list), for two stages sharing one GPU:

- ``cuda-host``: what such stages do today: the producer's activations are on ``cuda:0``, the
  channel (gloo, as the actors use it when stages share a GPU) copies them to host memory, the
  consumer moves them back to ``cuda:0``; a message counts once it is on the device;
- ``cuda-d2d``: one ``torch.cuda`` device-to-device copy of the same tensor in one process,
  timed with CUDA events: the physical limit of moving it between stages on one GPU
  ("x d2d" is to this).

One repetition: the producer sends N messages, the consumer receives N; the time from the first
send to the last receive (both read from the host's monotonic clock), divided by N, is the
per-message cost. Each round starts fresh processes per mode (modes interleaved) and discards
one warm-up repetition; the median over all rounds and repetitions is reported. Before each
mode the script waits until the CPUs are mostly idle (``--quiet``) and records how busy they were.

    .venv/bin/python bench/transport.py                # 64K 1M 4M 16M, 3 rounds x 3 repeats
    .venv/bin/python bench/transport.py --sizes 1M 64M --rounds 5 --json runs/bench/tr.json
    .venv/bin/python bench/transport.py --modes cuda-host cuda-d2d --sizes 1M 4M 16M 64M
"""

from __future__ import annotations

import argparse
import collections
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
from common import machine, wait_quiet
from torch.distributed import Work

from decoupled.channel import ForwardMessage, Kind, Policy
from decoupled.config import RuntimeConfig
from decoupled.ray_runtime.transport_ray import OrderedInbox, RaySender, WireMessage
from decoupled.ray_runtime.transport_torch import (
    TorchReceiver,
    TorchSender,
    close_process_group,
    free_port,
    open_process_group,
)

CAPACITY = RuntimeConfig().channel_capacity  # the default forward channel capacity
WINDOW = 2  # raw-async: sends in flight, receives posted ahead
CUDA_MODES = ("cuda-host", "cuda-d2d")
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
def post(work: Work | None) -> Work:
    assert work is not None  # None only for ranks outside the group
    return work


def send_all(mode: str, n: int, x: torch.Tensor, labels: torch.Tensor, sender: Any) -> None:
    if sender is not None:  # the project's channel
        for i in range(n):
            sender.send(ForwardMessage(i, Kind.TRAIN, x, labels), timeout=60.0)
    elif mode == "raw":
        for _ in range(n):
            dist.send(x, 1)
    else:  # raw-async: up to WINDOW sends posted at once
        works: collections.deque[Work] = collections.deque()
        for _ in range(n):
            if len(works) == WINDOW:
                works.popleft().wait()
            works.append(post(dist.isend(x, 1)))
        for work in works:
            work.wait()


def recv_all(mode: str, n: int, x: torch.Tensor, receiver: Any) -> None:
    if receiver is not None:
        for _ in range(n):
            message = receiver.recv(timeout=60.0)
            if message is None:
                raise TimeoutError("no message within 60 s")
            if mode == "cuda-host":  # a stage's first use: its input on its device
                message.activations.to(x.device)
        if mode == "cuda-host":
            torch.cuda.synchronize(x.device)
    elif mode == "raw":
        buffer = torch.empty_like(x)
        for _ in range(n):
            dist.recv(buffer, 0)
    else:  # raw-async: WINDOW receives posted ahead, into as many buffers
        buffers = [torch.empty_like(x) for _ in range(WINDOW)]
        works = collections.deque(post(dist.irecv(b, 0)) for b in buffers[:n])
        for i in range(n):
            works.popleft().wait()
            if i + WINDOW < n:
                works.append(post(dist.irecv(buffers[i % WINDOW], 0)))


def torch_worker(rank: int, mode: str, port: int, plan: Plan, repeats: int, out: Any) -> None:
    torch.set_num_threads(1)
    if mode.startswith("raw"):
        url = f"tcp://127.0.0.1:{port}"
        dist.init_process_group("gloo", init_method=url, rank=rank, world_size=2)
    else:
        open_process_group(rank, 2, "127.0.0.1", port, "gloo", 60.0)
    cpu, channel = torch.device("cpu"), mode.startswith("torch") or mode == "cuda-host"
    compute = torch.device("cuda", 0) if mode == "cuda-host" else cpu
    in_flight = 2 if mode == "torch-if2" else 1
    sender = receiver = None
    if channel and rank == 0:
        sender = TorchSender(1, "forward", cpu, max_in_flight=in_flight)
    elif channel:
        receiver = TorchReceiver(0, "forward", CAPACITY, Policy.BLOCK, cpu)
    for size, n in plan:
        x, labels = payload(size)
        x = x.to(compute)
        for rep in range(repeats + 1):  # repetition 0 is a warm-up
            dist.barrier()
            if rank == 0:
                out.put(("t0", size, rep, time.monotonic()))  # CLOCK_MONOTONIC: host-wide
                send_all(mode, n, x, labels, sender)
            else:
                recv_all(mode, n, x, receiver)
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


def run_d2d(mode: str, plan: Plan, repeats: int) -> list[Result]:
    """``cuda-d2d``: n device-to-device copies of the payload on cuda:0, timed by CUDA events."""
    device = torch.device("cuda", 0)
    results: list[Result] = []
    for size, n in plan:
        source = payload(size)[0].to(device)
        target = torch.empty_like(source)
        for rep in range(repeats + 1):  # repetition 0 is a warm-up
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            for _ in range(n):
                target.copy_(source)
            end.record()
            end.synchronize()
            if rep:
                results.append((mode, size, rep, start.elapsed_time(end) / 1e3 / n))
    return results


# --- Ray: two actors, as the stage actors are wired ----------------------------------------------
class Consumer:
    """The receiving half of ``StageActor``: ``deliver_forward`` into an ``OrderedInbox``."""

    def __init__(self) -> None:
        self.inbox = OrderedInbox(CAPACITY, Policy.BLOCK)
        self.thread: threading.Thread | None = None
        self.last = 0.0

    def deliver_forward(self, number: int, message: WireMessage) -> None:
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
        per_mode = {m: [r[3] for r in results if r[0] == m and r[1] == size] for m in modes}
        raws = {m: statistics.median(per_mode[m]) for m in ("raw", "raw-async") if m in modes}
        best = min(raws.values(), default=None)  # the faster raw mode at this size
        d2d = statistics.median(per_mode["cuda-d2d"]) if "cuda-d2d" in modes else None
        for mode in modes:
            per = per_mode[mode]
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
                    "ratio_to_raw": median / raws["raw"] if "raw" in raws else None,
                    "ratio_to_best_raw": median / best if best else None,
                    "ratio_to_d2d": median / d2d if d2d else None,
                    "runs_s": per,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | mode | messages | us/message (median) | min - max | MB/s | x raw | x best raw "
        "| x d2d |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        size = f"{r['bytes'] / 2**20:g} MB" if r["bytes"] >= 2**20 else f"{r['bytes'] >> 10} KB"
        ratios = [
            f"{v:.2f}" if v else "-"
            for v in (r["ratio_to_raw"], r["ratio_to_best_raw"], r["ratio_to_d2d"])
        ]
        lines.append(
            f"| {size} | {r['mode']} | {r['messages']} | {r['us_per_message']:.0f} | "
            f"{r['us_min']:.0f} - {r['us_max']:.0f} | {r['mb_per_s']:.0f} | {' | '.join(ratios)} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sizes = [2**16, 2**20, 2**22, 2**24, 2**26]  # 64K 1M 4M 16M 64M
    p.add_argument("--sizes", type=parse_size, nargs="+", default=sizes, help="e.g. 64K 1M 64M")
    modes = ["raw", "raw-async", "torch", "torch-if2", "ray", "ray-zc"]
    p.add_argument("--modes", nargs="+", default=modes, choices=[*modes, *CUDA_MODES])
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (+1 warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="fresh process pairs per mode")
    p.add_argument("--bytes-per-rep", type=parse_size, default=2**26, help="N = this / size")
    p.add_argument("--min-messages", type=int, default=8)
    p.add_argument("--max-messages", type=int, default=200)
    p.add_argument("--json", help="write the table rows and every repetition here")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.3,
        help="before each mode, wait until CPUs are at most this busy (0..1; 1: never)",
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if any(mode in CUDA_MODES for mode in args.modes) and not torch.cuda.is_available():
        raise SystemExit(f"modes {', '.join(CUDA_MODES)} need a CUDA device; this machine has none")
    plan: Plan = [
        (size, max(args.min_messages, min(args.max_messages, args.bytes_per_rep // size)))
        for size in args.sizes
    ]
    results: list[Result] = []
    busy: dict[str, float] = {}
    # Fresh processes per round: small-message latency differs from one launch to the next.
    for rnd in range(args.rounds):
        for mode in args.modes:
            load = wait_quiet(args.quiet, timeout_s=600)  # other work skews every figure
            busy[mode] = max(busy.get(mode, 0.0), load)
            started = time.perf_counter()
            run = (
                run_ray if mode.startswith("ray") else run_d2d if mode == "cuda-d2d" else run_torch
            )
            results += run(mode, plan, args.repeats)
            elapsed = time.perf_counter() - started
            print(f"[{rnd + 1}] {mode}: {elapsed:.1f}s (CPUs busy before: {load:.2f})", flush=True)
    rows = summarise(results, args.modes, plan)
    print(
        f"\nOne-way cost per message: median of {args.rounds} rounds x {args.repeats} repeats, "
        f"{os.cpu_count()} CPUs"
    )
    print(markdown(rows))
    if args.json:
        meta = machine() | {"cpu_busy_before_mode": busy}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
