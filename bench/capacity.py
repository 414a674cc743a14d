"""Channel capacity against target staleness, accuracy and throughput (runtime.channel_capacity).

A deeper channel lets a stage run further ahead of the stages after it. With balanced stages that
buys no throughput, but every message waiting in a channel is a step of staleness for the target
that comes back for it. This runs the digits default (3-stage cDNI, unless ``--set`` says
otherwise) through the Ray trainer for each capacity and seed and reports the mean target
staleness of stage 0, the final test accuracy and the steady-state samples/s.

    .venv/bin/python bench/capacity.py                                  # capacities 1 2 4, 3 seeds
    .venv/bin/python bench/capacity.py --capacities 1 2 4 8 --json bench/results/capacity.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import ray
from common import cell, machine, wait_quiet

from decoupled.config import load_config
from decoupled.data import load_dataset
from decoupled.ray_runtime.controller import train_on_ray

DIGITS = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


def run(capacity: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(
        DIGITS,
        [
            f"runtime.channel_capacity={capacity}",
            f"seed={seed}",
            "train.progress=false",
            "runtime.backend=ray",
            *args.set,
        ],
    )
    busy = wait_quiet(args.quiet, timeout_s=600)
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        summary = train_on_ray(cfg, load_dataset(cfg.data), Path(tmp))
    first = summary["stages"][0]
    return {
        "capacity": capacity,
        "seed": seed,
        "stages": summary["num_stages"],
        "staleness_mean": first["staleness_mean"],
        "staleness_p90": first["staleness_p90"],
        "test_accuracy": summary["test_accuracy"],
        "steady_samples_per_s": summary["steady_samples_per_s"],
        "cpu_busy_before": busy,
    }


def _median(values: list[float | None]) -> float | None:
    """Median of the known values (a short run may have no steady-state rate)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capacities", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE config overrides")
    p.add_argument("--json", type=Path, help="write every run and the medians here")
    p.add_argument(
        "--quiet", type=float, default=0.3, help="wait until the CPUs are at most this busy"
    )
    return p.parse_args()


def main() -> None:
    args = parse_args()
    ray.init(
        address="local",
        num_cpus=3,  # the default's three stages, one CPU each (they share this box's cores)
        num_gpus=0,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    runs: list[dict[str, Any]] = []
    try:
        for seed in args.seeds:  # interleaved: load drift hits every capacity alike
            for capacity in args.capacities:
                result = run(capacity, seed, args)
                runs.append(result)
                print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
    rows = []
    for capacity in args.capacities:
        mine = [r for r in runs if r["capacity"] == capacity]
        rows.append(
            {
                "capacity": capacity,
                **{
                    key: _median([r[key] for r in mine])
                    for key in ("staleness_mean", "test_accuracy", "steady_samples_per_s")
                },
                "test_accuracy_min": min(r["test_accuracy"] for r in mine),
                "test_accuracy_max": max(r["test_accuracy"] for r in mine),
            }
        )
    print(
        "\n| capacity | stage-0 staleness (median) | test accuracy (median) | min - max "
        "| steady samples/s |\n| ---: | ---: | ---: | ---: | ---: |"
    )
    for r in rows:
        print(
            f"| {r['capacity']} | {cell(r['staleness_mean'], '.1f')} | "
            f"{cell(r['test_accuracy'], '.3f')} | "
            f"{r['test_accuracy_min']:.3f} - {r['test_accuracy_max']:.3f} | "
            f"{cell(r['steady_samples_per_s'], '.0f')} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine()}
        args.json.write_text(json.dumps({"meta": meta, "results": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
