"""Where data parallelism overtakes decoupled stages: ddp against dgl (and any other method)
at K=2, over the batch size, on the throughput model.

ddp all-reduces every parameter's gradient each step (~34 MB for the 8x1024 FCN), a cost that
does not grow with the batch, while its compute per replica halves; a stage boundary carries one
activation per step, which grows with the batch, while each stage computes half the model. So
at small batches the all-reduce dominates and the decoupled stages win; at large batches the
compute dominates, ddp approaches 2x and the decoupled methods stay at their balance and
synthesizer or auxiliary-head overhead. This script finds the crossover on the machine at hand:
``bench/throughput.py``'s cases (one Ray instance, one torch thread per actor, steady-state
samples/s from metrics.jsonl) at each ``--batches`` value, every case once per repeat,
interleaved; ratios to backprop in one actor at the same batch.

    .venv/bin/python bench/ddp_crossover.py --batches 64 256 1024 --repeats 2 \\
        --json bench/results/ddp_crossover.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import ray
from common import add_model_args, machine
from throughput import Case, make_config, run_case

from decoupled.data import load_dataset

SAMPLES_PER_RUN = 16_384  # ~20 s of one-core backprop on the 8x1024 FCN


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--methods", nargs="+", default=["ddp", "dgl"], help="the K=2 cases")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--min-steps", type=int, default=60, help="steps per run at least")
    p.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE config overrides")
    p.add_argument("--quiet", type=float, default=0.3, help="wait until CPUs at most this busy")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    k = args.stages[0]
    cases = [Case("backprop", 1, "ray")] + [Case(m, k, "torch") for m in args.methods]
    ray.init(address="local", num_cpus=k, include_dashboard=False, logging_level=logging.WARNING)
    rates: dict[tuple[int, str], list[float]] = {}
    try:
        for rep in range(args.repeats):
            for batch in args.batches:
                steps = max(args.min_steps, SAMPLES_PER_RUN // batch)
                run_args = argparse.Namespace(**{**vars(args), "batch": batch, "steps": steps})
                for case in cases:
                    cfg = make_config(case, run_args)
                    result = run_case(case, cfg, load_dataset(cfg.data), args.quiet)
                    rate = result["steady_samples_per_s"]
                    rates.setdefault((batch, case.label), []).append(rate)
                    print(
                        f"[{rep + 1}/{args.repeats}] batch {batch} {case.label}: "
                        f"{rate:.0f} samples/s, busy before {result['cpu_busy_before']:.2f}",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    rows: list[dict[str, Any]] = []
    for batch in args.batches:
        base = statistics.median(rates[(batch, cases[0].label)])
        for case in cases:
            median = statistics.median(rates[(batch, case.label)])
            rows.append(
                {
                    "batch": batch,
                    "case": case.label,
                    "steady_median": median,
                    "runs": rates[(batch, case.label)],
                    "ratio_to_backprop": median / base,
                }
            )
    labels = [c.label for c in cases]
    print(
        f"\n{args.layers}x{args.hidden} FCN, steady samples/s (median of {args.repeats}) and "
        "x backprop in one actor at the same batch\n"
    )
    print("| batch | " + " | ".join(labels) + " | faster at K=2 |")
    print("| ---: | " + " | ".join("---:" for _ in labels) + " | --- |")
    for batch in args.batches:
        mine = [r for r in rows if r["batch"] == batch]
        cells = [f"{r['steady_median']:.0f} ({r['ratio_to_backprop']:.2f}x)" for r in mine]
        best = max(mine[1:], key=lambda r: r["steady_median"])["case"]
        print(f"| {batch} | " + " | ".join(cells) + f" | {best} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "args": vars(args), "results": rows}, indent=1, default=str
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
