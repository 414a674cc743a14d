"""Synthesizer settings on the time-to-accuracy workload, compared at equal steps.

Issue 16 asks DNI and cDNI to be made as good as the literature allows, each change measured on
the real workload. Time to accuracy is learning per step times steps per second; this script
measures the first factor, which does not depend on the machine's load: every case trains the
time-to-accuracy model (``configs/fashion_mnist_fcn.yaml``: Fashion-MNIST, FCN 6x1024 with batch
norm, batch 256, Adam 1e-3, K=2) in process (``LocalTrainer``, the stage logic the actors run)
for the same steps, with every target delivered ``--delay`` steps late (the actors' staleness
at K=2 is 1-3 steps), and reports the test accuracy against backprop's on the same seed.

Variants (``--variants``; each a list of config overrides on top of the config's cDNI/DNI):
``default`` (one hidden layer of 256, lr 1e-4), ``linear`` (no hidden layer, as in much of the
paper), ``hidden1024``, ``hidden128`` (half the synthesizer's cost on the critical path),
``lr1e-5``/``lr3e-4``/``lr1e-3`` (the synthesizer's Adam rate), ``scale0.1`` (the synthetic
gradient scaled down, Czarnecki et al. 2017), ``every2``/``every4`` (the synthesizer trained on
every n-th target only, which cuts its cost on the critical path).
The split is the even one (``model.boundaries=even``, [3] of 6 blocks) so that runs are
deterministic; ``auto`` chose [3] or [4] in the time-to-accuracy runs.

    .venv/bin/python bench/sg_sweep.py --root data --seeds 0 1 2 --jobs 2 \\
        --json bench/results/sg_sweep.json

Runs on a GPU too (the in-process trainer puts its stages on cuda:0 when there is one):
``--jobs`` processes then share it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, run_grid

from decoupled.config import Config, load_config
from decoupled.data import Dataset
from decoupled.local import LocalTrainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fashion_mnist_fcn.yaml"
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "linear": ["method.sg.layers=0"],
    "hidden1024": ["method.sg.hidden=1024"],
    "hidden128": ["method.sg.hidden=128"],
    "lr1e-5": ["method.sg.lr=1e-5"],
    "lr3e-4": ["method.sg.lr=3e-4"],
    "lr1e-3": ["method.sg.lr=1e-3"],
    "scale0.1": ["method.sg.scale=0.1"],
    "every2": ["method.sg.train_every=2"],
    "every4": ["method.sg.train_every=4"],
}
Key = tuple[str, str, int]  # method, variant, seed


def case_config(method: str, variant: str, seed: int, args: argparse.Namespace) -> Config:
    overrides = [
        f"seed={seed}",
        f"method.name={method}",
        f"stages={args.stages}",
        f"data.name={args.data}",
        f"data.root={args.root}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        "train.progress=false",
        "runtime.backend=local",
        f"method.delay={args.delay}",
        "model.boundaries=even",
        # Defaults, not the config's linear synthesizer: the variants change one thing each.
        "method.sg.layers=1",
        "method.sg.hidden=256",
        "method.sg.lr=1e-4",
        *args.set,
        *(VARIANTS[variant] if method != "backprop" else []),
    ]
    return load_config(CONFIG, overrides)


def one_run(key: Key, cfg: Config, data: Dataset) -> dict[str, Any]:
    """Final test accuracy, the accuracy curve, and stage 0's synthetic-gradient figures."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sg-") as tmp:
        out = Path(tmp)
        summary = LocalTrainer(cfg, data, out).run()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["step"], r["test_accuracy"]] for r in records if r.get("event") == "eval"]
    first = summary["stages"][0]
    method, variant, seed = key
    print(
        f"{method} {variant} seed {seed}: test accuracy {summary['test_accuracy']:.4f} "
        f"({time.perf_counter() - started:.0f}s)",
        flush=True,
    )
    return {
        "test_accuracy": summary["test_accuracy"],
        "curve": curve,
        "sg_cosine": first.get("sg_cosine"),
        "sg_true_cosine": first.get("sg_true_cosine"),
        "device": first.get("device"),
        "call_s": time.perf_counter() - started,
    }


def aggregate(results: dict[Key, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {seed: results[("backprop", "-", seed)]["test_accuracy"] for seed in args.seeds}
    rows = [
        {
            "method": "backprop",
            "variant": "-",
            "accuracy": [base[s] for s in args.seeds],
            "error_ratio": 1.0,
        }
    ]
    for method in args.methods:
        for variant in args.variants:
            runs = [results[(method, variant, seed)] for seed in args.seeds]
            ratios = [
                (1 - r["test_accuracy"]) / (1 - base[s])
                for r, s in zip(runs, args.seeds, strict=True)
            ]
            true_cos = [r["sg_true_cosine"] for r in runs if r["sg_true_cosine"] is not None]
            rows.append(
                {
                    "method": method,
                    "variant": variant,
                    "overrides": VARIANTS[variant],
                    "accuracy": [r["test_accuracy"] for r in runs],
                    "error_ratio": statistics.median(ratios),
                    "sg_true_cosine": statistics.median(true_cos) if true_cos else None,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | variant | final accuracy (median; min - max) | error x backprop (median) "
        "| stage 0 cos(SG, true) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        acc = r["accuracy"]
        cos = r.get("sg_true_cosine")
        lines.append(
            f"| {r['method']} | {r['variant']} | {statistics.median(acc):.4f} "
            f"({min(acc):.4f} - {max(acc):.4f}) | {r['error_ratio']:.2f} | "
            f"{'-' if cos is None else f'{cos:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion_mnist", help="data.name")
    p.add_argument("--root", default="data", help="data.root")
    p.add_argument("--methods", nargs="+", default=["cdni", "dni"], choices=["cdni", "dni"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--delay", type=int, default=1, help="method.delay: target staleness, steps")
    p.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE overrides for every case")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, in worker processes")
    p.add_argument("--json", type=Path, help="write every run and the table here")
    args = p.parse_args()
    configs = {("backprop", "-", s): case_config("backprop", "-", s, args) for s in args.seeds}
    configs |= {
        (m, v, s): case_config(m, v, s, args)
        for m in args.methods
        for v in args.variants
        for s in args.seeds
    }
    started = time.perf_counter()
    results = run_grid(configs, one_run, args.jobs)
    rows = aggregate(results, args)
    print(
        f"\n{args.data}, FCN 6x1024, K={args.stages}, {args.steps} steps, delay {args.delay}, "
        f"seeds {args.seeds}, in process on {next(iter(results.values()))['device']} "
        f"({time.perf_counter() - started:.0f}s)\n"
    )
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        runs = [{"key": list(k), **v} for k, v in results.items()]
        payload = {"machine": machine(), "args": {**vars(args), "json": str(args.json)}}
        args.json.write_text(json.dumps({**payload, "rows": rows, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
