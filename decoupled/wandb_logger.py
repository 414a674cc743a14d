"""Weights & Biases mirror of a run: the same records as metrics.jsonl, one W&B run per job.

Only the driver logs (``RunLog`` calls this module): it already polls every stage actor for its
figures and writes them to metrics.jsonl, so W&B receives exactly those records, with per-stage
figures under ``stage{i}/...``. The actors need no W&B install, key or network access, and a job
is one W&B run rather than K runs to stitch together (docs/monitoring.md argues this in full).

W&B is never allowed to stop training: any failure (no network, a bad key, a server error, a bug
in the client) becomes one warning, and from then on the run goes on with local logs only.
No Ray here, so the in-process trainer and the controller share it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from decoupled.build import num_stages
from decoupled.config import Config, config_to_dict

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

WARNING_PREFIX = "decoupled: W&B logging disabled: "
# wandb.init waits this long for the server before giving up (its default is 90 s); a run that
# cannot reach W&B should start training with local logs soon, not after minutes.
# WANDB_INIT_TIMEOUT / WANDB_FINISH_TIMEOUT in the environment take precedence.
INIT_TIMEOUT_S = 30.0
# run.finish() otherwise waits without limit for the upload; the .wandb file under the run
# folder keeps everything, so `wandb sync` can finish an upload that was cut short.
FINISH_TIMEOUT_S = 120.0
# Top-level figures a run logs besides the per-stage ones; all are plotted against samples.
RUN_KEYS = (
    "wall_s",
    "step",
    "epoch",
    "samples_per_s",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "restarts",
)
_STAGE_COUNTS = re.compile(r"^(stage\d+)/staleness_counts$")
MAX_HISTOGRAM_BINS = 64


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def staleness_window(
    counts: Mapping[Any, int], previous: Mapping[int, int] | None
) -> tuple[dict[int, int], dict[int, int]]:
    """(the whole run's counts with int keys, the counts added since ``previous``).

    Stages report cumulative counts (cheap and loss-free whatever the poll rate); the difference
    between two polls is the distribution of the targets that arrived in between. JSON turns the
    keys into strings, so they are read back as ints here."""
    total = {int(k): int(v) for k, v in counts.items()}
    before = previous or {}
    window = {k: n - before.get(k, 0) for k, n in total.items() if n > before.get(k, 0)}
    return total, window


def histogram_arrays(counts: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(counts per bin, bin edges) for a staleness distribution: one bin per step of staleness,
    centred on it, or at most MAX_HISTOGRAM_BINS equal bins over a long tail."""
    values = np.array(sorted(counts), dtype=float)
    weights = np.array([counts[int(v)] for v in values], dtype=float)
    lo, hi = values[0], values[-1]
    if hi - lo + 1 <= MAX_HISTOGRAM_BINS:
        edges = np.arange(lo - 0.5, hi + 1.5)
    else:
        edges = np.linspace(lo - 0.5, hi + 0.5, MAX_HISTOGRAM_BINS + 1)
    hist, edges = np.histogram(values, bins=edges, weights=weights)
    return hist.astype(np.int64), edges


def flatten_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json as W&B summary values: per-stage figures become ``stage{i}/key`` so they
    sit beside the logged series of the same name; other values are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if key == "stages" and isinstance(value, list):
            for figures in value:
                index = figures.get("index")
                for name, item in figures.items():
                    if name != "index" and item is not None:
                        out[f"stage{index}/{name}"] = item
        elif value is not None:
            out[key] = value
    return out


class WandbLogger:
    """One W&B run: ``log`` each record, ``finish`` with the summary. Inactive after a failure."""

    def __init__(self, run: Run, warn: Callable[[str], None]) -> None:
        self._run: Run | None = run
        self._warn = warn
        self._counts: dict[str, dict[int, int]] = {}  # the last cumulative counts per stage
        # Where the run is: its page (online), and its local folder, which `wandb sync` uploads.
        self.info = {
            "id": run.id,
            "mode": run.settings.mode,
            "url": run.url if not run.offline else None,  # (asking an offline run warns)
            "dir": run.settings.sync_dir,
        }

    @property
    def active(self) -> bool:
        return self._run is not None

    @classmethod
    def open(
        cls, cfg: Config, out_dir: Path | None, warn: Callable[[str], None] = _stderr
    ) -> WandbLogger | None:
        """Start the job's W&B run, or None when W&B is disabled or could not start."""
        settings = cfg.logging.wandb
        if settings.mode == "disabled":
            return None
        if settings.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            # The key comes from the environment only (never from the config), and wandb would
            # otherwise prompt for one on a terminal and hold the run until someone answers.
            warn(WARNING_PREFIX + "mode online needs WANDB_API_KEY in the environment")
            return None
        try:
            run = _init(cfg, out_dir)
        except Exception as err:
            warn(WARNING_PREFIX + _describe(err))
            return None
        try:
            logger = cls(run, warn)
            _define_metrics(run, num_stages(cfg))
        except Exception as err:
            with contextlib.suppress(Exception):  # a run that started must not stay open
                run.finish(exit_code=1)
            warn(WARNING_PREFIX + _describe(err))
            return None
        return logger

    def log(self, record: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._run.log(self._convert(record))
        except Exception as err:
            self._fail(err)

    def finish(self, summary: Mapping[str, Any] | None = None, failed: bool = False) -> None:
        """Set the summary (the final per-stage figures, whole-run staleness) and end the run."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            if summary is not None:
                values = flatten_summary(summary)
                import wandb

                for stage, counts in self._counts.items():
                    if counts:
                        hist, edges = histogram_arrays(counts)
                        values[f"{stage}/staleness"] = wandb.Histogram(np_histogram=(hist, edges))
                run.summary.update(values)
            run.finish(exit_code=1 if failed else 0)
        except Exception as err:
            self._warn(WARNING_PREFIX + _describe(err))

    def _convert(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Numbers as they are; cumulative staleness counts as a histogram of the window."""
        import wandb

        out: dict[str, Any] = {}
        for key, value in record.items():
            match = _STAGE_COUNTS.match(key)
            if match is not None and isinstance(value, Mapping):
                stage = match.group(1)
                total, window = staleness_window(value, self._counts.get(stage))
                self._counts[stage] = total
                if window:
                    hist, edges = histogram_arrays(window)
                    out[f"{stage}/staleness"] = wandb.Histogram(np_histogram=(hist, edges))
            elif isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = value
        return out

    def _fail(self, err: Exception) -> None:
        run, self._run = self._run, None
        self._warn(WARNING_PREFIX + _describe(err))
        if run is not None:
            # Release the client; whatever it managed to write stays in the .wandb file.
            with contextlib.suppress(Exception):
                run.finish(exit_code=1)


def _describe(err: Exception) -> str:
    text = " ".join(str(err).split()) or "no details"
    return f"{type(err).__name__}: {text} (the run goes on; local logs keep everything)"


def _init(cfg: Config, out_dir: Path | None) -> Run:
    import wandb

    w = cfg.logging.wandb
    k = num_stages(cfg)
    tags = [cfg.method.name, f"{k}-stages", cfg.data.name, *w.tags]
    settings = wandb.Settings(
        init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S)),
        finish_timeout=float(os.environ.get("WANDB_FINISH_TIMEOUT", FINISH_TIMEOUT_S)),
        # The console stays ours: the progress bar and the per-stage table are not captured.
        console="off",
        quiet=True,
    )
    # The run folder keeps the W&B files beside metrics.jsonl, unless WANDB_DIR says otherwise.
    directory = str(out_dir) if out_dir is not None and not os.environ.get("WANDB_DIR") else None
    return wandb.init(
        project=w.project,
        entity=w.entity,
        # Related runs: the same data and model, compared across methods and stage counts.
        group=w.group or f"{cfg.data.name}-{cfg.model.name}",
        job_type=cfg.method.name,
        name=out_dir.name if out_dir is not None else None,
        tags=list(dict.fromkeys(tags)),  # unique, in order
        config=config_to_dict(cfg),
        mode=cast(Literal["online", "offline"], w.mode),  # "disabled" never gets here
        dir=directory,
        settings=settings,
        # Each job is its own run, even when a process (a test, a notebook) runs several.
        reinit="create_new",
    )


def _define_metrics(run: Run, stages: int) -> None:
    """Everything against samples seen: the one x-axis that all asynchronous stages share (each
    stage steps at its own pace, and W&B's own step must only ever grow)."""
    run.define_metric("samples")
    for key in RUN_KEYS:
        run.define_metric(key, step_metric="samples")
    for i in range(stages):
        run.define_metric(f"stage{i}/*", step_metric="samples")
