"""One model's config trained by every method, on both backends, for the same budget of steps.

The question this answers for a model of the zoo (or the user's): does each method train it
end to end from the one config, in process (``runtime.backend=local``) and on the actors
(``runtime.backend=ray``: one Ray actor per stage, one torch thread each), and where does each
end after the same number of steps from the same seed? ``backprop`` runs on one stage (one
actor), every other method on ``--stages`` (``ddp``: replicas). Reported per run: the held-out
loss, accuracy (and bits per character for text), the steady samples/s, and for the
synthetic-gradient methods their cosine with the true gradient at each boundary (the probe,
where ``method.sg.probe_every`` is on). The local backend runs the stages one after another in
this process, so its samples/s is not a speed figure; the Ray backend's is.

    PYTHONPATH=. .venv/bin/python bench/methods_on_model.py \\
        --config configs/fashion_mnist_resnet.yaml --data-root data --steps 300 \\
        --json bench/results/resnet_methods.json

``bench/transformer.py`` is this script on ``configs/charlm_gpt.yaml`` (the Ray backend only).
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
from peer_pipelining import SCHEDULES
from throughput import Case, run_peer_case

from decoupled.api import run_training
from decoupled.config import ConfigError, load_config
from decoupled.data import load_dataset

BASELINE = "backprop"
METHODS = [BASELINE, "pipeline", "dni", "cdni", "dgl", "delayed", "ddp"]


def run_case(method: str, backend: str, args: argparse.Namespace) -> dict[str, Any]:
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
        f"runtime.backend={backend}",
        *args.set,
    ]
    cfg = load_config(args.config, overrides)
    busy = wait_quiet(args.quiet, timeout_s=args.quiet_timeout)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = run_training(cfg, Path(tmp))
        call_s = time.perf_counter() - start
    return {
        "method": method,
        "backend": backend,
        "stages": stages,
        "steps": summary["steps"],
        "test_loss": summary.get("test_loss"),
        "test_bpc": summary.get("test_bpc"),
        "test_accuracy": summary.get("test_accuracy"),
        "train_loss": summary.get("train_loss"),
        "steady_samples_per_s": summary.get("steady_samples_per_s"),
        "wall_s": call_s,
        "boundaries": summary.get("boundaries"),
        "sg_cosine": [s.get("sg_cosine") for s in summary["stages"][:-1]],
        "sg_true_cosine": [s.get("sg_true_cosine") for s in summary["stages"][:-1]],
        "cpu_busy_before": busy,
        "overrides": overrides,
    }


def run_peer(schedule: str, args: argparse.Namespace) -> dict[str, Any]:
    """The peer ``torch.distributed.pipelining`` schedule on K Ray actors: the model, split,
    data, micro-batches and optimizer of ``pipeline`` (bench/peer_pipelining.py). It is timed,
    not evaluated; its steady samples/s is its last stage's clock at every step."""
    overrides = [
        "method.name=pipeline",
        f"stages={args.stages}",
        f"seed={args.seed}",
        f"data.root={args.data_root}",
        f"train.steps={args.steps}",
        "runtime.backend=ray",
        *args.set,
    ]
    cfg = load_config(args.config, overrides)
    dataset = load_dataset(cfg.data, cfg.model.context, cfg.recurrent.eval_chars)
    busy = wait_quiet(args.quiet, timeout_s=args.quiet_timeout)
    result = run_peer_case(Case(schedule, args.stages, "peer"), cfg, dataset, busy)
    return {
        "method": f"{schedule} (peer)",
        "backend": "ray",
        "stages": args.stages,
        "steps": args.steps,
        "test_loss": None,
        "test_bpc": None,
        "test_accuracy": None,
        "train_loss": result["train_loss"],
        "steady_samples_per_s": result["steady_samples_per_s"],
        "wall_s": result["call_s"],
        "sg_cosine": [],
        "sg_true_cosine": [],
        "cpu_busy_before": busy,
        "overrides": overrides,
    }


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown, one row per run; samples/s against backprop's on the same backend."""
    text = any(r.get("test_bpc") is not None for r in runs)
    lines = [
        "| method | backend | K | held-out "
        + ("bits/char | held-out loss (nats) | token accuracy" if text else "loss | accuracy")
        + " | samples/s (steady) | vs backprop | SG/true-gradient cosine |",
        "| --- | --- | --- | --- | --- " + ("| --- " if text else "") + "| --- | --- | --- |",
    ]
    for r in runs:
        if "refused" in r:
            lines.append(f"| {r['method']} | {r['backend']} | refused: {r['refused']} |")
            continue
        base = next(
            (b for b in runs if b["method"] == BASELINE and b["backend"] == r["backend"]), None
        )
        rate, ratio = r["steady_samples_per_s"], None
        if base is not None and rate and base["steady_samples_per_s"]:
            ratio = rate / base["steady_samples_per_s"]
        cosines = [c for c in r["sg_true_cosine"] if c is not None]
        figures = [cell(r["test_loss"], ".3f"), cell(r["test_accuracy"], ".3f")]
        if text:
            figures.insert(0, cell(r["test_bpc"], ".3f"))
        lines.append(
            f"| {r['method']} | {r['backend']} | {r['stages']} | {' | '.join(figures)} "
            f"| {cell(rate, '.0f')} | {cell(ratio, '.2f')}x "
            f"| {', '.join(f'{c:.2f}' for c in cosines) or '-'} |"
        )
    return "\n".join(lines)


def parser(
    config: Path | None = None, backends: list[str] | None = None
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=config, required=config is None)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument(
        "--backends", nargs="+", choices=["local", "ray"], default=backends or ["local", "ray"]
    )
    p.add_argument(
        "--peer", nargs="*", default=[], choices=list(SCHEDULES), help="peer schedules (Ray)"
    )
    p.add_argument("--data-root", default="data", help="data.root")
    p.add_argument("--stages", type=int, default=2, help="K workers of the other methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--set", nargs="*", default=[], help="more KEY=VALUE overrides for every case")
    p.add_argument("--json", type=Path, help="write every run and the machine here")
    p.add_argument("--quiet", type=float, default=1.0, help="wait until CPUs at most this busy")
    p.add_argument("--quiet-timeout", type=float, default=60.0)
    return p


def main(args: argparse.Namespace) -> None:
    logging.getLogger("ray").setLevel(logging.WARNING)
    runs = []
    if "ray" in args.backends:
        ray.init(
            address="local",  # a fresh cluster, never one another process left running
            num_cpus=args.stages,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    try:
        for backend in args.backends:
            for method in args.methods:
                try:
                    runs.append(run_case(method, backend, args))
                except ConfigError as err:  # ddp on the local backend, say: a row saying why
                    refused = {"method": method, "backend": backend, "refused": str(err)}
                    runs.append(refused)
                print(json.dumps(runs[-1]), flush=True)
        for schedule in args.peer if "ray" in args.backends else []:
            runs.append(run_peer(schedule, args))
            print(json.dumps(runs[-1]), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(table(runs))
    if args.json:
        settings = vars(args) | {"json": str(args.json), "config": str(args.config)}
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "args": settings, "runs": runs}, indent=1, default=str
            )
            + "\n"
        )


if __name__ == "__main__":
    main(parser().parse_args())
