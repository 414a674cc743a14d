"""How much compute K processes get on this machine: the ceiling for K stages on K workers.

No transport, no Ray: each process builds its stage with ``decoupled.build.build_stage`` (the
same code the actors run), feeds it fixed random inputs, and counts training steps for a fixed
time after a common start. Scenarios (one torch thread per process):

- ``backprop``: the whole model in one process (the baseline);
- ``backprop x2``: two such processes at once: how well the machine runs 2 compute-bound
  processes (2.0x the first line's samples/s if it has 2 full cores to give);
- ``backprop, batch B/m``: the same model on a pipeline micro-batch: what micro-batching costs;
- ``dni stage i alone``: each DNI stage on its own (stage 0 also fits its synthesizer to one
  target per step, as in steady state);
- ``dni stages together``: all stages at once, each in its own process: the slowest stage's
  rate is what K-stage DNI could reach with a free, instant transport.

    .venv/bin/python bench/cores.py                      # K=2, 8x1024 FCN, batch 256, 10 s each
    .venv/bin/python bench/cores.py --stages 4 --seconds 20 --json runs/bench/cores.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch
from common import machine, wait_quiet

from decoupled.balance import balanced
from decoupled.build import build_stage
from decoupled.config import Config, parse_config
from decoupled.models import activation_shapes, build_stage_modules

INPUT_SHAPE = (1, 8, 8)  # the embedded digits
NUM_CLASSES = 10


def make_config(method: str, args: argparse.Namespace, batch: int = 0) -> Config:
    """The case's config with its split decided (once, here, for every worker)."""
    cfg = parse_config(
        {},
        [
            f"method.name={method}",
            f"stages={args.stages}",
            f"model.layers={args.layers}",
            f"model.hidden={args.hidden}",
            f"data.batch_size={batch or args.batch}",
            *args.set,
        ],
    )
    return balanced(cfg, INPUT_SHAPE, NUM_CLASSES)[0]


def worker(cfg: Config, index: int, seconds: float, start: Any, out: Any) -> None:
    """Train stage ``index`` of ``cfg`` on fixed inputs for ``seconds`` after ``start``."""
    torch.set_num_threads(1)
    stage = build_stage(cfg, index, INPUT_SHAPE, NUM_CLASSES)
    k = stage.stage.num_stages
    modules = build_stage_modules(cfg.model, k, INPUT_SHAPE, NUM_CLASSES, cfg.seed)
    shapes = [INPUT_SHAPE, *activation_shapes(modules, INPUT_SHAPE)]
    batch = cfg.data.batch_size
    x = torch.randn(batch, *shapes[index])
    y = torch.randint(0, NUM_CLASSES, (batch,))
    target = torch.randn(batch, *shapes[index + 1]) * 1e-3

    def step(seq: int) -> None:
        stage.forward(seq, x, y)
        if stage.expects_backward:  # one target back per step, as in steady state
            stage.backward(seq, target)

    for seq in range(3):  # warm-up: allocator, kernels
        step(seq)
    start.wait()
    began, seq = time.perf_counter(), 3
    while time.perf_counter() - began < seconds:
        step(seq)
        seq += 1
    elapsed = time.perf_counter() - began
    out.put((index, (seq - 3) * batch / elapsed, 1e3 * elapsed / (seq - 3)))


def run(cfg: Config, indices: list[int], seconds: float) -> list[tuple[int, float, float]]:
    """Run one process per stage index in ``indices`` at once; (index, samples/s, ms/step)."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(len(indices)), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(cfg, i, seconds, start, out)) for i in indices]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=600 + seconds) for _ in procs)
    for p in procs:
        p.join(60)
    return results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=2, help="K (processes for the DNI scenarios)")
    p.add_argument("--method", default="dni", choices=["dni", "cdni"])
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per scenario")
    p.add_argument("--repeats", type=int, default=3, help="runs per scenario (median)")
    p.add_argument("--micro-batches", type=int, default=4, help="for the small-batch line")
    p.add_argument("--layers", type=int, default=8, help="model.layers")
    p.add_argument("--hidden", type=int, default=1024, help="model.hidden")
    p.add_argument("--batch", type=int, default=256, help="data.batch_size")
    p.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE config overrides")
    p.add_argument("--quiet", type=float, default=0.3, help="wait for CPUs this idle (1: never)")
    p.add_argument("--json", help="write the rows here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    backprop, dni = make_config("backprop", args), make_config(args.method, args)
    small = make_config("backprop", args, batch=args.batch // args.micro_batches)
    k = args.stages
    scenarios: list[tuple[str, Config, list[int]]] = [
        ("backprop", backprop, [0]),
        ("backprop x2", backprop, [0, 0]),
        (f"backprop, batch {small.data.batch_size}", small, [0]),
        *[(f"{args.method} stage {i} alone", dni, [i]) for i in range(k)],
        (f"{args.method} stages together", dni, list(range(k))),
    ]
    runs: dict[str, list[list[tuple[int, float, float]]]] = {name: [] for name, _, _ in scenarios}
    busy: dict[str, float] = {}
    for rep in range(args.repeats):  # interleaved, so that drifting load hits all alike
        for name, cfg, indices in scenarios:
            busy[name] = max(busy.get(name, 0.0), wait_quiet(args.quiet, timeout_s=600))
            runs[name].append(run(cfg, indices, args.seconds))
            print(f"[{rep + 1}] {name}: {[f'{r[2]:.1f} ms/step' for r in runs[name][-1]]}")
    rows: list[dict[str, Any]] = []
    for name, cfg, indices in scenarios:
        # per process: the median over repeats of its samples/s
        rates = [statistics.median(rep[j][1] for rep in runs[name]) for j in range(len(indices))]
        batch = cfg.data.batch_size
        rows.append(
            {
                "scenario": name,
                "ms_per_step": [1e3 * batch / r for r in rates],
                "total_samples_per_s": sum(rates),
                "slowest_samples_per_s": min(rates),
                "cpu_busy_before_max": busy[name],
                "runs": runs[name],
            }
        )
    base = rows[0]["total_samples_per_s"]
    print(
        f"\n{args.layers}x{args.hidden} FCN, batch {args.batch}, one thread per process, "
        f"median of {args.repeats} x {args.seconds:g} s\n"
    )
    print("| scenario | ms/step per process | samples/s (sum) | slowest | slowest / backprop |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        per = ", ".join(f"{ms:.1f}" for ms in r["ms_per_step"])
        print(
            f"| {r['scenario']} | {per} | {r['total_samples_per_s']:.0f} | "
            f"{r['slowest_samples_per_s']:.0f} | {r['slowest_samples_per_s'] / base:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": machine() | {"args": vars(args)}, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
