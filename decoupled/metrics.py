"""What a run reports: metrics.jsonl records, the console progress bar, and summary.json.

Records are flat dicts; per-stage figures are keyed ``stage{i}/{name}`` so that the same record
goes to a JSON line, a plot or a W&B panel unchanged.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tqdm import tqdm

from decoupled.config import TEXT_DATASETS, Config
from decoupled.wandb_logger import WandbLogger

PER_STAGE_KEYS = (
    "samples_per_s",
    "busy_fraction",
    "input_wait_s",
    "channel_depth",
    "sg_loss",
    "sg_cosine",
    # The probe (method.sg.probe_every): the synthetic gradient against the loss's exact one.
    "sg_true_cosine",
    "sg_true_rel_error",
    "staleness_mean",
    "staleness_p50",
    "staleness_p90",
    "staleness_max",
    "targets_dropped",
    "targets_expired",
    "rss_mb",
    # The whole run's staleness counts {steps: targets}; W&B shows each poll window's share as a
    # histogram, the plots the final distribution.
    "staleness_counts",
    # Logged when a stage reports it (a restarted stage; CUDA stages: memory in MB, utilisation %).
    "restarts",
    "gpu_mem_mb",
    "gpu_max_mem_mb",
    "gpu_util",
)

# summary.json's per-stage figures: a stage's identity and placement, what it did over the run,
# and the logged figures that describe a whole run (the staleness counts stay in the metrics).
SUMMARY_STAGE_KEYS = (
    "index",
    "steps",
    "device",
    "node_ip",
    "node_id",
    "target_wait_s",
    "sg_updates",
    "sg_compute_s",
    # Seconds this stage spent on probe batches (method.sg.probe_every): the probe's cost.
    "probe_s",
    "replay_updates",
    *(k for k in PER_STAGE_KEYS if k != "staleness_counts"),
)
OPTIONAL_STAGE_KEYS = frozenset(
    {"restarts", "gpu_mem_mb", "gpu_max_mem_mb", "gpu_util", "replay_updates"}
)

# The steady-state window of a run opens at this fraction of its steps: actor start-up, the
# pipeline fill and early evaluations fall before it.
STEADY_FROM = 0.2


def summary_stage_figures(final: dict[str, Any]) -> dict[str, Any]:
    """The per-stage entry of summary.json from a stage's final figures (None where unknown;
    GPU figures and restarts only where the stage reported them)."""
    return {
        k: final.get(k)
        for k in SUMMARY_STAGE_KEYS
        if k not in OPTIONAL_STAGE_KEYS or final.get(k) is not None
    }


def steady_samples_per_s(
    progress: list[tuple[int, float]], first_step: int, total_steps: int, batch: int
) -> float | None:
    """Samples/s between the first progress point at or past ``STEADY_FROM`` of the run's steps
    and the last point before its end; None when the run logged too few points.

    progress: (step, wall_s) of every train record, in order.
    """
    opens = first_step + STEADY_FROM * (total_steps - first_step)
    inside = [(step, t) for step, t in progress if first_step < step < total_steps]
    start = next(((step, t) for step, t in inside if step >= opens), None)
    if start is None or inside[-1][0] <= start[0] or inside[-1][1] <= start[1]:
        return None
    end = inside[-1]
    return (end[0] - start[0]) * batch / (end[1] - start[1])


def stage_record(index: int, figures: dict[str, Any]) -> dict[str, Any]:
    """``{"stage{i}/key": value}`` for the per-stage figures that are set."""
    return {f"stage{index}/{k}": figures[k] for k in PER_STAGE_KEYS if figures.get(k) is not None}


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf; a diverged figure is written as null rather than breaking the file.
    # Nested too: summary.json's per-stage figures are a list of dicts.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class RunLog:
    """metrics.jsonl (flushed per record, so a crash keeps everything), the progress bar and,
    given the config, the job's W&B run, which receives every record too.

    ``finish(summary)`` ends the W&B run with the summary; leaving the ``with`` block on an
    exception ends it as failed. A clean exit leaves it open for ``finish``, because the
    trainers build the summary after the block."""

    def __init__(
        self,
        out_dir: Path | None,
        total_steps: int,
        progress: bool,
        cfg: Config | None = None,
    ) -> None:
        self.out_dir = out_dir
        self._bar: tqdm[Any] | None = None
        self._file = open(out_dir / "metrics.jsonl", "a") if out_dir is not None else None  # noqa: SIM115
        # Before the clock starts: connecting to W&B is not training time.
        self._wandb = WandbLogger.open(cfg, out_dir, self._warn) if cfg is not None else None
        self.start = time.perf_counter()
        # The same moment on the clock every process of the run shares (stages stamp their
        # evaluations with it).
        self.start_unix = time.time()
        if progress:
            self._bar = tqdm(total=total_steps, unit="step", file=sys.stderr, dynamic_ncols=True)
        self._postfix: dict[str, str] = {}
        self.progress: list[tuple[int, float]] = []  # (step, wall_s) of every train record

    def wall_s(self) -> float:
        return time.perf_counter() - self.start

    def since_start(self, unix_time: float) -> float:
        """Seconds from the run's start to ``unix_time`` (a ``time.time()`` stamp)."""
        return unix_time - self.start_unix

    def write(self, record: dict[str, Any]) -> None:
        record = {"wall_s": round(self.wall_s(), 4), **record}
        if record.get("event") == "train":
            self.progress.append((record["step"], record["wall_s"]))
        if self._file is not None:
            self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            self._file.flush()
        if self._wandb is not None:
            self._wandb.log(record)
        self._update_postfix(record)

    def finish(self, summary: dict[str, Any]) -> None:
        """Send the summary to W&B and end its run; ``summary["wandb"]`` then says where it is
        (id, url, local folder) so that summary.json can find it."""
        if self._wandb is None:
            return
        wandb, self._wandb = self._wandb, None
        if wandb.active:
            summary["wandb"] = wandb.info
        wandb.finish({k: v for k, v in summary.items() if k != "wandb"})

    def _warn(self, message: str) -> None:
        # Above the progress bar rather than through it.
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def advance(self, steps: int, position: int | None = None) -> None:
        if self._bar is not None:
            if position is not None:
                steps = position - self._bar.n
            self._bar.update(steps)

    def _update_postfix(self, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        for key, label in (
            ("train_loss", "loss"),
            ("train_accuracy", "acc"),
            ("test_accuracy", "test"),
            ("samples_per_s", "samples/s"),
        ):
            value = record.get(key)
            if isinstance(value, float):
                self._postfix[label] = f"{value:.4g}" if label != "samples/s" else f"{value:.0f}"
        self._bar.set_postfix(self._postfix, refresh=False)

    def close(self, failed: bool = False) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if failed and self._wandb is not None:
            self._wandb.finish(failed=True)
            self._wandb = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc is not None)


def build_summary(
    cfg: Config,
    *,
    num_stages: int,
    steps: int,
    wall_s: float,
    samples: int,
    train_loss: float | None,
    test_accuracy: float | None,
    stages: list[dict[str, Any]],
    steady_samples_per_s: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary.json contract of DESIGN.md, plus the run's identity.

    ``samples_per_s`` covers the whole call (start-up and evaluations included);
    ``steady_samples_per_s`` the middle of the run (see ``steady_samples_per_s``). Text adds
    ``test_bpc``, the held-out loss in bits per character."""
    test_loss = (extra or {}).get("test_loss")
    text = cfg.data.name in TEXT_DATASETS
    bpc = test_loss / math.log(2) if text and test_loss is not None else None
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        "stages": stages,
        "num_stages": num_stages,
        "dataset": cfg.data.name,
        "backend": cfg.runtime.backend,
        "steps": steps,
        "samples": samples,
        "wall_s": wall_s,
        "samples_per_s": samples / wall_s if wall_s > 0 else None,
        "steady_samples_per_s": steady_samples_per_s,
        "train_loss": train_loss,
        "test_accuracy": test_accuracy,
        **({"test_bpc": bpc} if bpc is not None else {}),
        **(extra or {}),
    }
    return {k: _jsonable(v) for k, v in summary.items()}


def write_summary(summary: dict[str, Any], out_dir: Path) -> None:
    text = json.dumps(summary, indent=2, default=_jsonable)
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(out_dir / "summary.json")
