"""Accuracy: the analogue of the paper's Table 1, and test accuracy against wall-clock time.

Part 1, ``table``: an FCN of 3 to 6 layers trained by ``backprop``, ``dni`` and ``cdni`` for
the same number of epochs. On MNIST it is the paper's setting, ``configs/mnist_fcn{3,4,5,6}.yaml``
(hidden layers of 256 units with batch norm, Adam 3e-5, batch 256, a synthesizer of 2 hidden
layers of 1024 units, learning rate 3e-5). On the digits fallback it is ``configs/digits.yaml``
(the same 256-unit layers, Adam 1e-3, batch 64, a linear synthesizer with learning rate 1e-4)
at each depth: the paper's rates are tuned for 500k MNIST steps and leave a digits model
untrained after its 150 steps of 30 epochs at batch 256. Runs are repeated
over several seeds. As in the paper's Table 1 there is a DNI between every pair of layers: an
L-layer FCN runs as L stages of one layer each. The runs use the in-process ``LocalTrainer``
(one torch thread): the same ``Stage`` step logic the Ray actors run, in order, with every
synthetic-gradient target delivered at the end of its own step (``method.delay=0``), so the
figures are deterministic for a seed and do not depend on the load of the machine. The data is
MNIST when ``data.root`` holds its IDX files, otherwise the embedded UCI digits (said so in the
output and the JSON). The paper's CIFAR-10 CNN (``configs/cifar10_cnn.yaml``, a DNI after every
conv layer) is added when ``cifar-10-batches-py/`` is in ``data.root``.

Part 2, ``tta`` (time to accuracy): backprop on one Ray actor against cDNI on K stages (K
actors), through the real runtime (``train_on_ray``, torch.distributed transport, one torch
thread per actor): ``configs/digits.yaml`` (Adam 1e-3) on the model and batch of
``bench/throughput.py`` (8-layer FCN of 1024 units, batch 256), cDNI once with digits.yaml's
linear synthesizer and once with the 1x256 MLP synthesizer throughput.py used. The test set is
evaluated every few steps; test accuracy against ``wall_s`` is read from the run's
``metrics.jsonl``. ``wall_s`` counts from the start of the run, actor start-up included (the
controller writes an evaluation when it polls, every 0.5 s). Repeats are interleaved, each
after ``wait_quiet``.

    .venv/bin/python bench/accuracy.py --json bench/results/accuracy.json --plots docs/img
    .venv/bin/python bench/accuracy.py --parts table --layers 3 6 --seeds 0 1 2 3 4 --epochs 60
    .venv/bin/python bench/accuracy.py --parts tta --tta-steps 400 --tta-repeats 3
    .venv/bin/python bench/accuracy.py --data-root /data/mnist --epochs 5   # MNIST, if present

K stages on K workers need K free cores: on a 2-core machine the time-to-accuracy part is
meaningful for K=2 only.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import machine, preload, run_grid, wait_quiet
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, PercentFormatter

from decoupled.config import Config, DataConfig, ModelConfig, block_count, load_config
from decoupled.data import DataError, Dataset, load_dataset
from decoupled.local import LocalTrainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TARGET = 1.25  # DESIGN.md: cDNI test error within 1.25x backprop's at equal epochs
DIGITS_CONFIG = CONFIGS / "digits.yaml"
DIGITS_EPOCHS = 30  # the default budget on the digits fallback (22 steps per epoch at batch 64)
COLORS = {"backprop": "tab:blue", "dni": "tab:red", "cdni": "tab:green"}
# Time-to-accuracy synthesizers for cDNI: digits.yaml's linear one (its best accuracy) and the
# one bench/throughput.py measured (the config default, much cheaper than a 1034x1024 matrix).
TTA_SG = {
    "linear": ["method.sg.layers=0"],
    "mlp": ["method.sg.layers=1", "method.sg.hidden=256"],
}


# -- part 1: Table 1 ---------------------------------------------------------------------------


def table_data(name: str, root: str) -> tuple[Dataset, str | None]:
    """``name`` (MNIST or another IDX set) from ``root`` by the project's loader, or the digits
    and why ``name`` is not used."""
    try:
        return load_dataset(DataConfig(name=name, root=root)), None
    except DataError as err:
        return load_dataset(DataConfig(name="digits")), str(err)


def table_config(
    model: str, layers: int, method: str, seed: int, data: str, args: argparse.Namespace
) -> Config:
    """This depth's config with a DNI between every pair of layers (blocks): the paper's on
    MNIST; on the digits fallback, digits.yaml's (the paper's Adam 3e-5 at batch 256 barely
    moves a model in the 150 steps of 30 digits epochs, so it would compare starts, not
    methods)."""
    if model == "fcn" and data == "digits":
        path = DIGITS_CONFIG
        epochs = args.epochs
    elif model == "fcn":
        # Only 3-6 layers are shipped; other depths take the 3-layer file's settings.
        path = CONFIGS / f"mnist_fcn{layers}.yaml"
        path = path if path.is_file() else CONFIGS / "mnist_fcn3.yaml"
        epochs = args.epochs
    else:
        path = CONFIGS / "cifar10_cnn.yaml"
        epochs = args.cifar_epochs
    overrides = [
        f"seed={seed}",
        f"method.name={method}",
        f"model.layers={layers}",
        f"data.name={data}",
        f"data.root={args.data_root}",
        "train.eval_every=0",  # once per epoch: the learning curves
        "train.progress=false",
        "runtime.backend=local",
    ]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    elif data == "digits":
        overrides.append(f"train.epochs={DIGITS_EPOCHS}")
    blocks = block_count(ModelConfig(name=model, layers=layers))
    return load_config(path, [*overrides, *args.set, f"stages={blocks}"])


def table_run(cfg: Config, dataset: Dataset) -> dict[str, Any]:
    """One training run in this process; final figures and the per-epoch test curve."""
    with tempfile.TemporaryDirectory(prefix="bench-acc-") as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        summary = LocalTrainer(cfg, dataset, out).run()
        call_s = time.perf_counter() - started
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [
        [round(r["epoch"], 3), r["test_accuracy"]] for r in records if r.get("event") == "eval"
    ]
    accuracy = summary["test_accuracy"]
    return {
        "seed": cfg.seed,
        "test_accuracy": accuracy,
        "test_error": 1.0 - accuracy,
        "steps": summary["steps"],
        "call_s": call_s,
        "sg_cosine": [s.get("sg_cosine") for s in summary["stages"][:-1]],
        "curve": curve,  # [epoch, test accuracy] after every epoch
    }


def table_row(
    model: str, layers: int, method: str, runs: list[dict[str, Any]], base: float | None
) -> dict[str, Any]:
    errors = [r["test_error"] for r in runs]
    mean = statistics.mean(errors)
    ratio = mean / base if base else None
    return {
        "model": model,
        "layers": layers,
        "method": method,
        "seeds": [r["seed"] for r in runs],
        "error_mean": mean,
        "error_std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
        "error_min": min(errors),
        "error_max": max(errors),
        "ratio_to_backprop": ratio,
        "meets_target": ratio <= TARGET if method == "cdni" and ratio is not None else None,
        "runs": runs,
    }


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    dataset, fallback = table_data(args.table_data, args.data_root)
    if fallback is not None:
        print(
            f"{args.table_data} not found, so the FCN grid runs on the embedded digits: {fallback}"
        )
    grids: list[tuple[str, list[int], Dataset]] = [("fcn", args.layers, dataset)]
    cifar_missing: str | None = None
    if args.cifar_layers:
        try:
            grids.append(
                ("cnn", args.cifar_layers, load_dataset(DataConfig("cifar10", args.data_root)))
            )
        except DataError as err:
            cifar_missing = str(err)
            print(f"CIFAR-10 not found, so the CNN rows are skipped: {cifar_missing}")
    rows: list[dict[str, Any]] = []
    epochs: dict[str, int] = {}
    for _, _, data in grids:
        preload(data)
    configs = {
        (model, layers, method, seed): table_config(model, layers, method, seed, data.name, args)
        for model, depths, data in grids
        for layers in depths
        for method in args.methods
        for seed in args.seeds
    }
    results = run_grid(configs, _grid_run, args.jobs)
    for model, depths, _ in grids:
        for layers in depths:
            base: float | None = None
            for method in args.methods:
                runs = [results[(model, layers, method, seed)] for seed in args.seeds]
                epochs[model] = configs[(model, layers, method, args.seeds[0])].train.epochs
                row = table_row(model, layers, method, runs, base)
                if method == "backprop":
                    base = row["error_mean"]
                rows.append(row)
    return {
        "data": dataset.name,
        "mnist_missing": fallback,
        "cifar_missing": cifar_missing,
        "epochs": epochs,
        "rows": rows,
    }


GridKey = tuple[str, int, str, int]  # model, layers, method, seed


def _grid_run(key: GridKey, cfg: Config, data: Dataset) -> dict[str, Any]:
    run = table_run(cfg, data)
    model, layers, method, seed = key
    print(
        f"{data.name} {model} {layers} layers, {method}, seed {seed}: "
        f"test error {run['test_error']:.2%} after {run['steps']} steps ({run['call_s']:.1f}s)",
        flush=True,
    )
    return run


def table_markdown(table: dict[str, Any]) -> str:
    lines = [
        "| model | layers | method | test error (mean ± std) | min - max | x backprop | target |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in table["rows"]:
        ratio = f"{r['ratio_to_backprop']:.2f}" if r["ratio_to_backprop"] is not None else "-"
        target = {True: "met", False: "missed", None: "-"}[r["meets_target"]]
        if r["method"] == "cdni":
            target = f"<= {TARGET:.2f}: {target}"
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['method']} | "
            f"{r['error_mean']:.2%} ± {r['error_std']:.2%} | "
            f"{r['error_min']:.2%} - {r['error_max']:.2%} | {ratio} | {target} |"
        )
    return "\n".join(lines)


def plot_table(table: dict[str, Any], path: Path) -> None:
    """Test error against epochs, one panel per depth: the mean over seeds and its range."""
    depths = sorted({(r["model"], r["layers"]) for r in table["rows"]})
    fig = Figure(figsize=(3.2 * len(depths), 3.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # Agg only: no pyplot, no display
    axes = fig.subplots(1, len(depths), sharey=True, squeeze=False)[0]
    for ax, (model, layers) in zip(axes, depths, strict=True):
        for r in table["rows"]:
            if (r["model"], r["layers"]) != (model, layers):
                continue
            epochs = [e for e, _ in r["runs"][0]["curve"]]
            errors = [[1.0 - a for _, a in run["curve"]] for run in r["runs"]]
            mean = [statistics.mean(col) for col in zip(*errors, strict=True)]
            color = COLORS.get(r["method"])
            ax.plot(epochs, mean, color=color, label=r["method"])
            ax.fill_between(
                epochs,
                [min(c) for c in zip(*errors, strict=True)],
                [max(c) for c in zip(*errors, strict=True)],
                color=color,
                alpha=0.2,
                linewidth=0,
            )
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # 2%, 5%, 20%, 50%: legible
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.yaxis.set_minor_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_title(f"{model.upper()}, {layers} layers")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"test error ({table['data']})")
    axes[0].legend()
    fig.savefig(path)


# -- part 2: time to accuracy ------------------------------------------------------------------


def tta_config(method: str, sg: str | None, args: argparse.Namespace) -> Config:
    """The default experiment (configs/digits.yaml: Adam 1e-3) on the model and batch of
    bench/throughput.py, where compute, not messaging, sets the pace; cDNI with ``TTA_SG[sg]``."""
    overrides = [
        f"method.name={method}",
        f"stages={args.tta_stages}",  # backprop keeps the whole model on one actor anyway
        f"data.batch_size={args.tta_batch}",
        f"model.layers={args.tta_layers}",
        f"model.hidden={args.tta_hidden}",
        f"train.steps={args.tta_steps}",
        f"train.eval_every={args.tta_eval_every}",
        "train.progress=false",
        "runtime.backend=ray",
        "runtime.transport=torch",
        "runtime.cpus_per_stage=1",
        *(TTA_SG[sg] if sg is not None else []),
    ]
    return load_config(CONFIGS / "digits.yaml", overrides)


def reached(evals: list[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """The first evaluation at or above ``threshold``: its step and wall_s."""
    hit = next((e for e in evals if e["test_accuracy"] >= threshold), None)
    return {"step": hit["step"], "wall_s": hit["wall_s"]} if hit is not None else None


def tta_run(cfg: Config, dataset: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    busy = wait_quiet(args.quiet, timeout_s=args.quiet_timeout)
    from decoupled.ray_runtime.controller import train_on_ray  # Ray only for this part

    with tempfile.TemporaryDirectory(prefix="bench-tta-") as tmp:
        out = Path(tmp)
        summary = train_on_ray(cfg, dataset, out)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = sorted((r for r in records if r.get("event") == "eval"), key=lambda r: r["step"])
    total = cfg.train.steps or 0
    train = [r for r in records if r.get("event") == "train" and 0 < r.get("step", 0) < total]
    # The training rate once running: between the first and the last progress record before
    # the end, so actor start-up and the final evaluation are left out.
    if len(train) < 2 or train[-1]["wall_s"] <= train[0]["wall_s"]:
        raise RuntimeError("too few progress records to time the run: raise the steps")
    first, last = train[0], train[-1]
    rate = (last["step"] - first["step"]) / (last["wall_s"] - first["wall_s"])
    return {
        "cpu_busy_before": busy,
        "wall_s": summary["wall_s"],
        "test_accuracy": summary["test_accuracy"],
        "steps_per_s": rate,
        # Where the run would have been at step 0 at that rate: actor start-up and rendezvous.
        "startup_s": first["wall_s"] - first["step"] / rate,
        "reached": {f"{t:g}": reached(evals, t) for t in args.thresholds},
        "curve": [[e["step"], e["wall_s"], e["test_accuracy"]] for e in evals],
    }


def run_tta(args: argparse.Namespace) -> dict[str, Any]:
    import ray  # not needed by the table, which may run where Ray is not installed

    dataset = load_dataset(DataConfig(name="digits"))
    # (label, method, synthesizer)
    cases: list[tuple[str, str, str | None]] = [("backprop K=1", "backprop", None)]
    cases += [(f"cdni K={args.tta_stages}, {sg} SG", "cdni", sg) for sg in args.tta_sg]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in cases}
    ray.init(  # "local": a fresh instance even if another Ray runs on this machine
        address="local",
        num_cpus=max(args.tta_stages, 1),
        num_gpus=0,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        for rep in range(args.tta_repeats):
            for label, method, sg in cases:  # interleaved, so load drift hits all alike
                run = tta_run(tta_config(method, sg, args), dataset, args)
                runs[label].append(run)
                times = ", ".join(
                    f"{t}: {h['wall_s']:.1f}s" if h else f"{t}: not reached"
                    for t, h in run["reached"].items()
                )
                print(
                    f"[{rep + 1}/{args.tta_repeats}] {label}: final {run['test_accuracy']:.3f} "
                    f"in {run['wall_s']:.1f}s, {run['steps_per_s']:.2f} steps/s; {times}; "
                    f"busy before {run['cpu_busy_before']:.2f}",
                    flush=True,
                )
    finally:
        ray.shutdown()
    rows = []
    for label, method, sg in cases:
        thresholds = {}
        for key in (f"{t:g}" for t in args.thresholds):
            hits = [r["reached"][key] for r in runs[label]]
            done = [h for h in hits if h is not None]
            thresholds[key] = {
                "runs_reaching": len(done),
                "wall_s_median": statistics.median(h["wall_s"] for h in done) if done else None,
                "step_median": statistics.median(h["step"] for h in done) if done else None,
            }
        rows.append(
            {
                "case": label,
                "method": method,
                "sg": sg,
                "stages": args.tta_stages if method != "backprop" else 1,
                "steps_per_s_median": statistics.median(r["steps_per_s"] for r in runs[label]),
                "startup_s_median": statistics.median(r["startup_s"] for r in runs[label]),
                "final_accuracy_median": statistics.median(r["test_accuracy"] for r in runs[label]),
                "thresholds": thresholds,
                "runs": runs[label],
            }
        )
    return {"cases": rows}


def tta_markdown(tta: dict[str, Any], thresholds: list[float]) -> str:
    heads = "".join(f" time to {t:g} (step) |" for t in thresholds)
    lines = [
        f"| case | steps/s | start-up s | final test accuracy |{heads}",
        "| --- | ---: | ---: | ---: |" + " ---: |" * len(thresholds),
    ]
    for c in tta["cases"]:
        cells = ""
        for t in (f"{t:g}" for t in thresholds):
            h = c["thresholds"][t]
            if h["wall_s_median"] is None:
                cells += " not reached |"
            else:
                cells += (
                    f" {h['wall_s_median']:.1f}s ({h['step_median']:.0f};"
                    f" {h['runs_reaching']}/{len(c['runs'])} runs) |"
                )
        lines.append(
            f"| {c['case']} | {c['steps_per_s_median']:.2f} | {c['startup_s_median']:.1f} | "
            f"{c['final_accuracy_median']:.3f} |{cells}"
        )
    return "\n".join(lines)


def plot_tta(tta: dict[str, Any], thresholds: list[float], path: Path) -> None:
    """Test accuracy against wall-clock time and against steps, every run."""
    fig = Figure(figsize=(10, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    by_time, by_step = fig.subplots(1, 2, sharey=True)
    palette = iter(["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:red"])
    for c in tta["cases"]:
        color = next(palette, None)
        for i, run in enumerate(c["runs"]):
            steps = [s for s, _, _ in run["curve"]]
            wall = [w for _, w, _ in run["curve"]]
            acc = [a for _, _, a in run["curve"]]
            label = c["case"] if i == 0 else None
            by_time.plot(wall, acc, color=color, alpha=0.8, label=label)
            by_step.plot(steps, acc, color=color, alpha=0.8, label=label)
    for ax in (by_time, by_step):
        for t in thresholds:
            ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylim(max(0.0, min(thresholds) - 0.4), 1.0)
        ax.grid(alpha=0.3)
    by_time.set_xlabel("wall-clock s (actor start-up included)")
    by_step.set_xlabel("training step")
    by_time.set_ylabel("test accuracy (digits)")
    by_time.legend(loc="lower right")
    fig.suptitle("Time to accuracy: backprop on one actor vs cDNI on K actors")
    fig.savefig(path)


# -- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["table", "tta"], choices=["table", "tta"])
    p.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6], help="FCN depths")
    p.add_argument("--methods", nargs="+", default=["backprop", "dni", "cdni"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--epochs",
        type=int,
        help=f"FCN epochs per run (default: {DIGITS_EPOCHS} on digits, the configs' 50 on MNIST)",
    )
    p.add_argument("--data-root", default="data", help="data.root: where MNIST / CIFAR-10 are")
    p.add_argument(
        "--table-data",
        default="mnist",
        choices=["mnist", "fashion_mnist", "mnist10k"],
        help="the FCN grid's data.name (the digits when it is not in --data-root)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="table runs at a time, in worker processes of one thread each (one per free core)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        help="KEY=VALUE overrides of the grid's configs (tuned settings; said in the output)",
    )
    p.add_argument(
        "--cifar-layers",
        type=int,
        nargs="*",
        default=[3],
        help="CNN depths (conv layers) when CIFAR-10 is present; none to skip",
    )
    p.add_argument("--cifar-epochs", type=int, help="CNN epochs (default: the config's 50)")
    p.add_argument("--tta-stages", type=int, default=2, help="K for cDNI (K free cores)")
    p.add_argument("--tta-steps", type=int, default=300, help="training steps per run")
    p.add_argument(
        "--tta-sg", nargs="+", default=list(TTA_SG), choices=list(TTA_SG), help="cDNI synthesizers"
    )
    p.add_argument("--tta-eval-every", type=int, default=5, help="steps between evaluations")
    p.add_argument("--tta-repeats", type=int, default=2, help="runs per case, interleaved")
    p.add_argument("--tta-layers", type=int, default=8, help="model.layers")
    p.add_argument("--tta-hidden", type=int, default=1024, help="model.hidden")
    p.add_argument("--tta-batch", type=int, default=256, help="data.batch_size")
    p.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.9, 0.95], help="test accuracies to time"
    )
    p.add_argument("--json", type=Path, help="write every run and the aggregates here")
    p.add_argument("--plots", type=Path, help="write accuracy_table.png, time_to_accuracy.png here")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.3,
        help="before each timed run, wait (<= --quiet-timeout) until the CPUs "
        "are at most this busy (0..1; 1 = do not wait)",
    )
    p.add_argument("--quiet-timeout", type=float, default=180.0, help="seconds (default 180)")
    args = p.parse_args()
    if "backprop" not in args.methods:
        p.error("--methods must include backprop: it is the baseline of every ratio")
    args.methods = ["backprop", *(m for m in args.methods if m != "backprop")]
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # in-process runs: one thread, like each actor, and reproducible
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if "table" in args.parts:
        cpu = time.process_time()
        result["table"] = table = run_table(args)
        # One thread throughout: this is what the grid costs on an idle core.
        table["cpu_s"] = time.process_time() - cpu
        table["wall_s"] = time.perf_counter() - started
        epochs = ", ".join(f"{m}: {e}" for m, e in table["epochs"].items())
        print(
            f"\nTable 1 analogue on {table['data']} ({epochs} epochs; seeds {args.seeds}; "
            f"overrides {args.set or 'none'}); "
            f"test error = 1 - final test accuracy; x backprop = mean error / backprop's.\n"
        )
        print(table_markdown(table))
    if "tta" in args.parts:
        result["tta"] = tta = run_tta(args)
        print(
            f"\nTime to accuracy on digits: {args.tta_layers}x{args.tta_hidden} FCN, batch "
            f"{args.tta_batch}, {args.tta_steps} steps, evaluation every {args.tta_eval_every} "
            f"steps; medians over {args.tta_repeats} runs (wall_s from the run's start).\n"
        )
        print(tta_markdown(tta, args.thresholds))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        if "table" in result:
            plot_table(result["table"], args.plots / "accuracy_table.png")
        if "tta" in result:
            plot_tta(result["tta"], args.thresholds, args.plots / "time_to_accuracy.png")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        if args.json.is_file():  # the parts not run this time keep their earlier results
            earlier = json.loads(args.json.read_text())
            result = {k: earlier[k] for k in ("table", "tta") if k in earlier} | result
        meta = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine(),
            "total_s": time.perf_counter() - started,
        }
        args.json.write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
