"""The GPT on text: every chain method against backprop, on a fixed budget of steps.

Trains ``configs/charlm_gpt.yaml`` (a GPT-style decoder-only transformer, one character per
token) through the real runtime (``train_on_ray``: one Ray actor per stage, one torch thread
each, torch.distributed transport): ``backprop`` on one actor, then ``pipeline``, ``dni``,
``cdni``, ``dgl`` (and any other ``--methods``) on K actors, each for the same number of steps
from the same seed, and reports the held-out loss (nats and bits per character), the per-token
accuracy and the steady-state samples/s of each. The question: what synthetic gradients do to
transformer blocks on separate workers, against the true gradients of backprop and pipeline.

    PYTHONPATH=. .venv/bin/python bench/transformer.py --data-root data \\
        --json bench/results/transformer.json

Needs the fortune files (``make charlm-data``) under ``--data-root``, or a text file there.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from common import cell, machine, wait_quiet

from decoupled.config import load_config
from decoupled.data import load_dataset
from decoupled.ray_runtime.controller import train_on_ray

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "charlm_gpt.yaml"
BASELINE = "backprop"


def run_case(method: str, args: argparse.Namespace) -> dict[str, Any]:
    stages = 1 if method == BASELINE else args.stages
    overrides = [
        f"method.name={method}",
        f"stages={stages}",
        f"seed={args.seed}",
        f"data.root={args.data_root}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.steps}",
        "train.log_every=10",
        "train.progress=false",
        "runtime.backend=ray",
        *args.set,
    ]
    cfg = load_config(CONFIG, overrides)
    dataset = load_dataset(cfg.data, cfg.model.context, cfg.recurrent.eval_chars)
    busy = wait_quiet(args.quiet, timeout_s=args.quiet_timeout)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = train_on_ray(cfg, dataset, Path(tmp))
        call_s = time.perf_counter() - start
    return {
        "method": method,
        "stages": stages,
        "steps": summary["steps"],
        "test_loss": summary["test_loss"],
        "test_bpc": summary["test_bpc"],
        "test_accuracy": summary["test_accuracy"],
        "train_loss": summary["train_loss"],
        "steady_samples_per_s": summary["steady_samples_per_s"],
        "wall_s": call_s,
        "boundaries": summary["boundaries"],
        "sg_cosine": [s.get("sg_cosine") for s in summary["stages"][:-1]],
        "sg_true_cosine": [s.get("sg_true_cosine") for s in summary["stages"][:-1]],
        "cpu_busy_before": busy,
        "overrides": overrides,
    }


def table(runs: list[dict[str, Any]]) -> str:
    base = next((r for r in runs if r["method"] == BASELINE), None)
    lines = [
        "| method | K | held-out bits/char | held-out loss (nats) | token accuracy "
        "| samples/s (steady) | vs backprop | SG/true-gradient cosine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        rate, ratio = r["steady_samples_per_s"], None
        if base is not None and rate and base["steady_samples_per_s"]:
            ratio = rate / base["steady_samples_per_s"]
        cosines = [c for c in r["sg_true_cosine"] if c is not None]
        lines.append(
            f"| {r['method']} | {r['stages']} | {cell(r['test_bpc'], '.3f')} "
            f"| {cell(r['test_loss'], '.3f')} | {cell(r['test_accuracy'], '.3f')} "
            f"| {cell(rate, '.0f')} | {cell(ratio, '.2f')}x "
            f"| {', '.join(f'{c:.2f}' for c in cosines) or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=[BASELINE, "pipeline", "dni", "cdni", "dgl"])
    p.add_argument("--data-root", default="data", help="data.root: fortunes or a text file")
    p.add_argument("--stages", type=int, default=2, help="K workers of the chain methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE overrides for every case")
    p.add_argument("--json", type=Path, help="write every run and the machine here")
    p.add_argument("--quiet", type=float, default=1.0, help="wait until CPUs at most this busy")
    p.add_argument("--quiet-timeout", type=float, default=60.0)
    args = p.parse_args()
    logging.getLogger("ray").setLevel(logging.WARNING)
    ray.init(
        address="local",  # a fresh cluster, never one another process left running
        num_cpus=args.stages,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        runs = []
        for method in args.methods:
            runs.append(run_case(method, args))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        ray.shutdown()
    print(table(runs))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "args": vars(args) | {"json": str(args.json)}, "runs": runs},
                indent=1,
                default=str,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
