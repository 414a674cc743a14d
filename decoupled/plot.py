"""``decoupled plot RUN_DIR``: PNG figures of a run from its metrics.jsonl, for runs without W&B.

Four files: ``training.png`` (loss and accuracy against samples seen and wall time),
``stages.png`` (per stage: busy and waiting shares of each log interval, channel depth, memory),
``synthetic_gradients.png`` (SG/target cosine, SG loss, target staleness over the run and its
whole-run distribution) and ``dashboard.png``, one page of the most telling panels.

Matplotlib is used through ``Figure`` and the Agg canvas only: no pyplot, no display, and no
change to the backend of a process that imports this module.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import (
    EngFormatter,
    FuncFormatter,
    MaxNLocator,
    NullFormatter,
    PercentFormatter,
)

_STAGE_KEY = re.compile(r"^stage(\d+)/(.+)$")
DPI = 110
Panel = Callable[[Axes, "RunData"], None]


class NoMetrics(Exception):
    """The folder has no metrics.jsonl, or no record in it."""


@dataclass
class RunData:
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    restarts: list[dict[str, Any]]
    stages: list[int]
    title: str
    colors: dict[int, str] = field(default_factory=dict)
    channel_capacity: int | None = None

    def series(self, key: str, x: str = "samples") -> tuple[list[float], list[float]]:
        """(x, y) over the train records where ``key`` is a number."""
        return _series(self.train, key, x)


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``; a line cut short by a crash is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise NoMetrics(f"{run_dir}: no metrics.jsonl (is this a run folder?)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise NoMetrics(f"{path}: no records yet")
    return records


def load_run(run_dir: Path) -> RunData:
    records = load_records(run_dir)
    stages = sorted(
        {int(m.group(1)) for r in records for k in r if (m := _STAGE_KEY.match(k)) is not None}
    )
    palette = [f"C{i}" for i in range(10)]
    return RunData(
        train=[r for r in records if r.get("event") == "train"],
        evals=[r for r in records if r.get("event") == "eval"],
        restarts=[r for r in records if r.get("event") == "restart"],
        stages=stages,
        title=_title(run_dir),
        colors={s: palette[s % len(palette)] for s in stages},
        channel_capacity=_channel_capacity(run_dir),
    )


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs of ``run_dir`` into ``out_dir`` (default ``run_dir/plots``)."""
    data = load_run(run_dir)
    out_dir = out_dir if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    pages: dict[str, tuple[int, list[Panel]]] = {
        "training": (2, [_loss, _accuracy, _loss_wall, _accuracy_wall]),
        "stages": (2, [_busy, _wait, _depth, _memory]),
        "synthetic_gradients": (2, [_cosine, _sg_loss, _staleness, _staleness_distribution]),
        "dashboard": (3, [_loss, _accuracy, _throughput, _busy, _cosine, _staleness]),
    }
    written = []
    for name, (columns, panels) in pages.items():
        path = out_dir / f"{name}.png"
        _page(data, panels, columns, path)
        written.append(path)
    return written


# -- pages and panels ------------------------------------------------------------------------


def _page(data: RunData, panels: Sequence[Panel], columns: int, path: Path) -> None:
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5.2 * columns, 3.9 * rows + 0.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(data.title, fontsize=13)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.grid(True, alpha=0.3)
        panel(ax, data)
        if not ax.has_data():
            # A backend or method that does not measure this (the local trainer has no
            # channels; the last stage has no synthesizer): say so rather than draw empty axes.
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(
                0.5,
                0.5,
                "not recorded in this run",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.4",
            )
            continue
        if ax.get_xlabel() == _AXIS_LABELS["samples"]:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            _mark_restarts(ax, data)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.savefig(path)


def _line(ax: Axes, series: tuple[list[float], list[float]], *fmt: str, **style: Any) -> bool:
    """Plot a series if it has points (an empty line would still count as data)."""
    if not series[0]:
        return False
    if len(series[0]) == 1 and not fmt:
        style.setdefault("marker", "o")  # a line through one point draws nothing
    ax.plot(*series, *fmt, **style)
    return True


def _loss(ax: Axes, data: RunData, x: str = "samples") -> None:
    _line(ax, data.series("train_loss", x), label="train (per interval)", color="C0")
    _line(ax, _series(data.evals, "test_loss", x), "o-", ms=3, label="test", color="C3")
    _log_scale(ax)
    _labels(ax, "Loss", x, "cross-entropy")


def _accuracy(ax: Axes, data: RunData, x: str = "samples") -> None:
    _line(ax, data.series("train_accuracy", x), label="train (per interval)", color="C0")
    test = _series(data.evals, "test_accuracy", x)
    _line(ax, test, "o-", ms=3, label="test", color="C3")
    title = f"Accuracy (best test {max(test[1]):.4f})" if test[1] else "Accuracy"
    _labels(ax, title, x, "accuracy")


def _loss_wall(ax: Axes, data: RunData) -> None:
    _loss(ax, data, "wall_s")


def _accuracy_wall(ax: Axes, data: RunData) -> None:
    _accuracy(ax, data, "wall_s")


def _throughput(ax: Axes, data: RunData) -> None:
    seen = [(r, float(r["samples"])) for r in _with(data, "samples")]
    _line(ax, _rate(seen, x="wall_s", cap=None), color="C2", alpha=0.5, label="per interval")
    _line(ax, data.series("samples_per_s", "wall_s"), color="C2", lw=2, label="run average")
    ax.set_ylim(bottom=0)
    _labels(ax, "Throughput", "wall_s", "samples/s")


def _busy(ax: Axes, data: RunData) -> None:
    for s in data.stages:
        key = f"stage{s}/busy_fraction"
        compute = [(r, r[key] * r["wall_s"]) for r in _with(data, key)]
        _line(ax, _rate(compute), label=f"stage {s}", color=data.colors[s])
    _share_axis(ax)
    _labels(ax, "Busy computing (share of each interval)", "samples", "busy")


def _wait(ax: Axes, data: RunData) -> None:
    for s in data.stages[1:]:  # stage 0 reads its data directly
        key = f"stage{s}/input_wait_s"
        waited = [(r, r[key]) for r in _with(data, key)]
        _line(ax, _rate(waited), label=f"stage {s}", color=data.colors[s])
    _labels(ax, "Waiting for input (share of each interval)", "samples", "waiting")
    if _all_zero(ax):  # the local trainer never waits: nothing was measured
        for line in ax.get_lines():
            line.remove()
        return
    _share_axis(ax)


def _depth(ax: Axes, data: RunData) -> None:
    for s in data.stages[1:]:
        series = data.series(f"stage{s}/channel_depth")
        _line(ax, series, label=f"into stage {s}", color=data.colors[s])
    if ax.has_data() and data.channel_capacity is not None:
        # A channel that sits at its capacity is backpressure: the stage after it is the
        # bottleneck.
        ax.axhline(data.channel_capacity, color="0.4", ls="--", lw=1, label="capacity")
    ax.set_ylim(bottom=0)
    _labels(ax, "Forward channel depth (mean per interval)", "samples", "messages waiting")


def _memory(ax: Axes, data: RunData) -> None:
    gpu = any(f"stage{s}/gpu_mem_mb" in r for r in data.train for s in data.stages)
    key, what = ("gpu_mem_mb", "GPU memory allocated") if gpu else ("rss_mb", "Resident memory")
    for s in data.stages:
        _line(ax, data.series(f"stage{s}/{key}"), label=f"stage {s}", color=data.colors[s])
    ax.set_ylim(bottom=0)  # flat memory should look flat, not like a climb of a few MB
    _labels(ax, f"{what} per stage", "samples", "MB")


def _cosine(ax: Axes, data: RunData) -> None:
    """Against the (mostly bootstrapped) target, solid; against the exact gradient of the loss
    from the probe, dashed with markers: the second says how good the gradient really is."""
    for s in data.stages:
        color = data.colors[s]
        _line(ax, data.series(f"stage{s}/sg_cosine"), label=f"stage {s} target", color=color)
        exact = data.series(f"stage{s}/sg_true_cosine")
        _line(ax, exact, "o--", ms=3, label=f"stage {s} exact", color=color)
    if ax.has_data():
        ax.axhline(0, color="0.5", lw=0.8)
    _labels(
        ax, "Synthetic gradient vs target (-) and exact gradient (--): cosine", "samples", "cosine"
    )


def _sg_loss(ax: Axes, data: RunData) -> None:
    for s in data.stages:
        _line(ax, data.series(f"stage{s}/sg_loss"), label=f"stage {s}", color=data.colors[s])
    _log_scale(ax)
    _labels(ax, "Synthesizer loss (MSE to its target)", "samples", "loss")


def _staleness(ax: Axes, data: RunData) -> None:
    top = 1.0
    for s in data.stages:
        xs, p50 = data.series(f"stage{s}/staleness_p50")
        if not xs:
            continue
        color = data.colors[s]
        ax.plot(xs, p50, color=color, label=f"stage {s}")
        p90 = data.series(f"stage{s}/staleness_p90")
        if p90[0] == xs:
            ax.fill_between(xs, p50, p90[1], color=color, alpha=0.2, lw=0)
        peak = data.series(f"stage{s}/staleness_max")
        _line(ax, peak, ":", color=color, lw=1)
        top = max(top, *peak[1], *p90[1])
    ax.set_ylim(-0.05 * top, 1.1 * top)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _labels(ax, "Target staleness: median, band to p90, max dotted", "samples", "steps")


def _staleness_distribution(ax: Axes, data: RunData) -> None:
    finals: dict[int, dict[int, int]] = {}
    for s in data.stages:
        for record in reversed(data.train):
            counts = record.get(f"stage{s}/staleness_counts")
            if isinstance(counts, dict) and counts:
                finals[s] = {int(k): int(v) for k, v in counts.items()}
                break
    if not finals:
        return
    width = 0.8 / len(finals)
    for i, (s, counts) in enumerate(finals.items()):
        total = sum(counts.values())
        values = sorted(counts)
        offset = (i - (len(finals) - 1) / 2) * width
        shares = [counts[v] / total for v in values]
        label = f"stage {s} ({total} targets)"
        ax.bar([v + offset for v in values], shares, width, color=data.colors[s], label=label)
    lo = min(min(c) for c in finals.values())
    hi = max(max(c) for c in finals.values())
    ax.set_xlim(lo - 1, hi + 1)
    if hi - lo <= 20:
        ax.set_xticks(range(lo, hi + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title("Target staleness over the whole run")
    ax.set_xlabel("staleness (steps between using an activation and its target)")
    ax.set_ylabel("share of targets")


# -- helpers ---------------------------------------------------------------------------------

_AXIS_LABELS = {"samples": "samples seen", "wall_s": "wall time (s)"}


def _labels(ax: Axes, title: str, x: str, y: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(_AXIS_LABELS.get(x, x))
    ax.set_ylabel(y)


def _series(records: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for record in records:
        xv, yv = record.get(x), record.get(key)
        if isinstance(xv, int | float) and isinstance(yv, int | float) and _number(xv + yv):
            xs.append(float(xv))
            ys.append(float(yv))
    return xs, ys


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _with(data: RunData, key: str) -> list[dict[str, Any]]:
    """The train records that have ``key`` and a wall time."""
    return [r for r in data.train if _number(r.get(key)) and _number(r.get("wall_s"))]


def _rate(
    points: list[tuple[dict[str, Any], float]], x: str = "samples", cap: float | None = 1.0
) -> tuple[list[float], list[float]]:
    """Growth of a cumulative total per second of wall time between consecutive records (for
    seconds of compute or of waiting: the share of the interval): what a stage did lately,
    not since the start. An interval where the total went down (a restarted stage counts from
    zero again) is left out."""
    xs, ys = [], []
    for (before, t0), (after, t1) in itertools.pairwise(points):
        span = after["wall_s"] - before["wall_s"]
        if span > 0 and t1 >= t0 and _number(after.get(x)):
            rate = (t1 - t0) / span
            xs.append(float(after[x]))
            ys.append(rate if cap is None else min(rate, cap))
    return xs, ys


def _share_axis(ax: Axes) -> None:
    ax.set_ylim(-0.02, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _all_zero(ax: Axes) -> bool:
    lines = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    return all(not y.any() for y in lines)


def _log_scale(ax: Axes) -> None:
    """Losses span decades: a log axis, unless values at or below zero are more than a few (an
    SG loss is exactly 0 while its bootstrapped target is still 0; such points are left out)."""
    lines = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    values = np.concatenate(lines) if lines else np.empty(0)
    positive = values[values > 0]
    if not positive.size or positive.size < 0.9 * values.size:
        return
    ax.set_yscale("log", nonpositive="mask")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.3 rather than 3×10⁻¹
    ax.yaxis.set_major_formatter(plain)
    # Within a decade or so the in-between ticks carry the labels; over many, only decades.
    narrow = positive.max() < 30 * positive.min()
    ax.yaxis.set_minor_formatter(plain if narrow else NullFormatter())


def _mark_restarts(ax: Axes, data: RunData) -> None:
    for i, record in enumerate(data.restarts):
        if _number(record.get("samples")):
            ax.axvline(
                record["samples"], color="k", ls="--", lw=0.8, label="restart" if i == 0 else None
            )


def _channel_capacity(run_dir: Path) -> int | None:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        capacity = config["runtime"]["channel_capacity"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return capacity if isinstance(capacity, int) else None


def _title(run_dir: Path) -> str:
    """What ran and how it ended, from summary.json (when the run finished) or config.yaml."""
    name = run_dir.resolve().name
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict):
        parts = [
            f"{summary.get('method')} on {summary.get('dataset')}, "
            f"{summary.get('num_stages')} stage(s), {summary.get('backend')}"
        ]
        if _number(summary.get("test_accuracy")):
            parts.append(f"test accuracy {summary['test_accuracy']:.4f}")
        if _number(summary.get("samples_per_s")):
            parts.append(f"{summary['samples_per_s']:.0f} samples/s")
        return f"{name}: " + ", ".join(parts)
    return name
