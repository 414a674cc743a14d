"""Recurrent DNI against truncated BPTT (Jaderberg et al. 2016, section 3.1, Table 2 analogue).

Part ``copy``: for each truncation T, the longest Copy and Repeat Copy length that the curriculum
reached (error below ``--threshold`` bits per written character over the last 10 batches) after a
fixed number of training batches, for tBPTT (``method.name=backprop``) and DNI-aided tBPTT
(``method.name=dni``, a linear zero-initialised synthesizer on the LSTM's (h, c)), over seeds.
Part ``charlm``: held-out bits per character on Debian's fortune files (``make charlm-data``)
after the same number of training characters at each T.
Part ``clock`` (section 3.2): two cores at two clock rates on two Ray actors
(``configs/copy_twotimescale.yaml``), lockstep (true gradients, the slow core waits for them)
against decoupled (synthetic gradients; ``--clock-ahead`` bounds how far the slow core may run
ahead of its true gradients, 0: unbounded): the fast core's accuracy and error over its last
chunks, each actor's samples/s, how long the slow actor waited on the fast one, the chunks the
fast actor skipped. These runs take the machine's cores, so they run one after another, and
their times depend on the machine's load.

The paper trains a 256-unit LSTM on batches of 256 for as long as the curriculum keeps going; this
benchmark is scaled down to fit a small CPU machine (the defaults below: 64 units, a fixed budget
of batches, an alphabet of 4 characters). Every run is in-process with one torch thread and is
deterministic for its seed, so the figures do not depend on the machine's load (times do).

    PYTHONPATH=. .venv/bin/python bench/recurrent.py --json bench/results/recurrent.json
    PYTHONPATH=. .venv/bin/python bench/recurrent.py --parts charlm --data-root data
    PYTHONPATH=. .venv/bin/python bench/recurrent.py --parts charlm --sg-scale 0.1 --seeds 0 1 2 \
        --lm-chars 16000 --workers 1 --json bench/results/recurrent_charlm_scale0.1.json
    PYTHONPATH=. .venv/bin/python bench/recurrent.py --parts clock --seeds 0 \
        --json bench/results/recurrent_clock.json

Runs are appended to ``<json>.runs.jsonl`` as they finish; a rerun skips those already there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

METHODS = ("backprop", "dni")
LABEL = {"backprop": "tBPTT", "dni": "DNI + tBPTT"}


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process; returns the job with its summary's figures."""
    import torch

    from decoupled.config import parse_config
    from decoupled.recurrent.trainer import run_recurrent

    torch.set_num_threads(1)
    cfg = parse_config(job["config"])
    summary = run_recurrent(cfg, None)
    keep = ("longest_solved", "final_length", "final_error_bits", "test_bpc", "train_loss")
    return {**job, **{k: summary.get(k) for k in keep}, "wall_s": summary["wall_s"]}


CLOCK_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "copy_twotimescale.yaml"
CLOCK_TARGET = 0.99  # accuracy of the fast core over its last chunks
CLOCK_KEEP = (
    "mode",
    "accuracy",
    "error_bits",
    "slow_samples_per_s",
    "fast_samples_per_s",
    "slow_wait_s",
    "slow_wait_fraction",
    "fast_wait_s",
    "slow_chunks",
    "fast_chunks",
    "skipped_chunks",
    "unsent_outputs",
    "wall_s",
)


def _clock_label(method: str, ahead: int) -> str:
    if method == "backprop":
        return "lockstep"
    return f"decoupled, max_ahead={ahead}" if ahead else "decoupled"


def _run_clock(job: dict[str, Any]) -> dict[str, Any]:
    """One two-actor run on Ray, in this process (it starts and stops its own Ray)."""
    import tempfile

    from decoupled.api import train

    with tempfile.TemporaryDirectory() as out:
        summary = train(CLOCK_CONFIG, job["overrides"], out=Path(out) / "run")
        records = [json.loads(x) for x in (Path(out) / "run" / "metrics.jsonl").open()]
    # Time to accuracy: the first train record at CLOCK_TARGET, its run time and fast chunks.
    hit = next(
        (r for r in records if r.get("event") == "train" and (r["accuracy"] or 0) >= CLOCK_TARGET),
        None,
    )
    slow = summary["stages"][0]
    return {
        **job,
        "target_wall_s": hit["wall_s"] if hit else None,
        "target_fast_chunks": hit["fast_chunks"] if hit else None,
        **{k: summary.get(k) for k in CLOCK_KEEP},
        "sg_cosine": slow.get("sg_cosine"),
        "dropped_targets": slow.get("dropped_targets"),
    }


def _clock_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    jobs = []
    for seed in args.seeds:
        for method, ahead in [("backprop", 0), *(("dni", a) for a in args.clock_ahead)]:
            label = _clock_label(method, ahead)
            overrides = [
                f"seed={seed}",
                f"method.name={method}",
                f"clock.max_ahead={ahead}",
                f"train.steps={args.clock_steps}",
                f"optim.lr={args.clock_lr}",
                f"clock.fast_delay_s={args.clock_fast_delay}",
                f"clock.slow_delay_s={args.clock_slow_delay}",
                "train.progress=false",
            ]
            jobs.append(
                {
                    "task": "lag_copy",
                    "method": label,
                    "bptt": 0,
                    "seed": seed,
                    "overrides": overrides,
                }
            )
    return jobs


def clock_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per run of part ``clock``."""
    lines = [
        "\nlag_copy, two cores on two Ray actors (accuracy, error: the fast core's last chunks)\n",
        "| mode | seed | accuracy | error (bits) | slow samples/s | fast samples/s "
        "| slow waited (s, fraction) | fast chunks (skipped) | wall s "
        f"| to {CLOCK_TARGET:.0%}: s (fast chunks) |",
        "| --- |" + " --- |" * 9,
    ]
    for r in results:
        hit = "-"
        if r.get("target_wall_s") is not None:
            hit = f"{r['target_wall_s']:.1f} ({r['target_fast_chunks']})"
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['accuracy']:.3f} | {r['error_bits']:.3f} "
            f"| {r['slow_samples_per_s']:.0f} | {r['fast_samples_per_s']:.0f} "
            f"| {r['slow_wait_s']:.2f} ({r['slow_wait_fraction']:.2f}) "
            f"| {r['fast_chunks']} ({r['skipped_chunks']}) | {r['wall_s']:.1f} | {hit} |"
        )
    return "\n".join(lines)


def _config(
    args: argparse.Namespace, task: str, method: str, bptt: int, seed: int
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "seed": seed,
        "stages": 1,
        "data": {"name": task, "batch_size": args.batch},
        "model": {"name": "lstm", "layers": 1, "hidden": args.hidden, "bptt": bptt},
        "method": {"name": method, "sg": {"layers": 0, "lr": args.sg_lr, "scale": args.sg_scale}},
        "optim": {"name": "adam", "lr": args.lr},
        "train": {"steps": args.steps, "log_every": args.steps, "progress": False},
        "recurrent": {
            "alphabet": args.alphabet,
            "repeats": args.repeats,
            "threshold": args.threshold,
            "aux_weight": args.aux_weight if method == "dni" else 0.0,
        },
        "runtime": {"backend": "local"},
    }
    if task == "charlm":
        steps = max(args.lm_chars // bptt, 1)
        cfg["data"].update(root=args.data_root, batch_size=args.lm_batch)
        cfg["model"]["hidden"] = args.lm_hidden
        cfg["train"].update(steps=steps, log_every=steps)
        cfg["recurrent"]["eval_chars"] = args.eval_chars
    return cfg


def _key(job: dict[str, Any]) -> tuple[str, str, int, int]:
    return job["task"], job["method"], job["bptt"], job["seed"]


def _jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    jobs = []
    if "copy" in args.parts:
        # Seed by seed, so that a run cut short still has whole rows of the table.
        for seed in args.seeds:
            for task in args.tasks:
                for bptt in args.bptt:
                    for method in METHODS:
                        cfg = _config(args, task, method, bptt, seed)
                        jobs.append(
                            {
                                "task": task,
                                "method": method,
                                "bptt": bptt,
                                "seed": seed,
                                "config": cfg,
                            }
                        )
    if "charlm" in args.parts:
        for seed in args.seeds:
            for bptt in args.lm_bptt:
                for method in METHODS:
                    cfg = _config(args, "charlm", method, bptt, seed)
                    jobs.append(
                        {
                            "task": "charlm",
                            "method": method,
                            "bptt": bptt,
                            "seed": seed,
                            "config": cfg,
                        }
                    )
    return jobs


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per task and T, the longest solved length per seed and its mean; or BPC."""
    lines = []
    for task in sorted({r["task"] for r in results}):
        rows = [r for r in results if r["task"] == task]
        figure = "test_bpc" if task == "charlm" else "longest_solved"
        what = (
            "held-out bits/char" if task == "charlm" else "longest length solved (per seed; mean)"
        )
        lines += [
            f"\n{task}: {what}\n",
            "| T | " + " | ".join(LABEL[m] for m in METHODS) + " |",
            "| --- |" + " --- |" * len(METHODS),
        ]
        for bptt in sorted({r["bptt"] for r in rows}):
            cells = []
            for method in METHODS:
                found = sorted(
                    (r for r in rows if r["bptt"] == bptt and r["method"] == method),
                    key=lambda r: r["seed"],
                )
                values = [r[figure] for r in found]
                if not values:
                    cells.append("-")
                elif figure == "test_bpc":
                    cells.append(" ".join(f"{v:.3f}" for v in values))
                else:
                    cells.append(
                        f"{' '.join(str(v) for v in values)}; {statistics.mean(values):.1f}"
                    )
            lines.append(f"| {bptt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["copy"], choices=["copy", "charlm", "clock"])
    p.add_argument("--tasks", nargs="+", default=["copy", "repeat_copy"])
    p.add_argument("--bptt", nargs="+", type=int, default=[2, 3, 4, 5, 8])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500, help="training batches per copy run")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--alphabet", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.15)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sg-lr", type=float, default=1e-3)
    p.add_argument(
        "--sg-scale",
        type=float,
        default=1.0,
        help="method.sg.scale: the synthetic gradient's multiplier, the bootstrap's discount",
    )
    p.add_argument("--aux-weight", type=float, default=0.0)
    p.add_argument("--lm-bptt", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--lm-chars", type=int, default=24_000, help="training characters per stream")
    p.add_argument("--lm-batch", type=int, default=32)
    p.add_argument("--lm-hidden", type=int, default=128)
    p.add_argument("--eval-chars", type=int, default=50_000)
    p.add_argument("--data-root", default="data")
    p.add_argument("--clock-steps", type=int, default=3000, help="slow ticks per clock run")
    p.add_argument("--clock-lr", type=float, default=1e-3)
    p.add_argument("--clock-ahead", nargs="+", type=int, default=[0, 2])
    p.add_argument("--clock-fast-delay", type=float, default=0.0, help="s of sleep per chunk")
    p.add_argument("--clock-slow-delay", type=float, default=0.0, help="s of sleep per tick")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("bench/results/recurrent.json"))
    args = p.parse_args(argv)

    log = args.json.with_suffix(".runs.jsonl")
    done: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[_key(r)] = r
    jobs = [j for j in _jobs(args) if _key(j) not in done]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with (
        ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool,
        log.open("a") as out,
    ):
        futures = [pool.submit(_run, job) for job in jobs]
        for future in as_completed(futures):
            r = future.result()
            done[_key(r)] = r
            out.write(json.dumps({k: v for k, v in r.items() if k != "config"}) + "\n")
            out.flush()
            print(
                f"{r['task']} T={r['bptt']} {r['method']} seed {r['seed']}: "
                f"solved {r.get('longest_solved')} bpc {r.get('test_bpc')} ({r['wall_s']:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    if "clock" in args.parts:
        with log.open("a") as out:
            for job in _clock_jobs(args):
                if _key(job) in done:
                    continue
                r = _run_clock(job)
                done[_key(r)] = r
                out.write(json.dumps(r) + "\n")
                out.flush()
                print(
                    f"clock {r['method']} seed {r['seed']}: accuracy {r['accuracy']:.3f}, slow "
                    f"waited {r['slow_wait_s']:.2f}s ({r['wall_s']:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    wanted = {_key(j) for j in _jobs(args)}
    results = [done[k] for k in sorted(wanted) if k in done]
    clock = [done[_key(j)] for j in _clock_jobs(args) if "clock" in args.parts]
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "workers")}
    args.json.write_text(
        json.dumps(
            {
                "settings": settings,
                "runs": [{k: v for k, v in r.items() if k != "config"} for r in results + clock],
            },
            indent=1,
        )
        + "\n"
    )
    if results:
        print(table(results))
    if clock:
        print(clock_table(clock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
