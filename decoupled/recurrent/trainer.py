"""The in-process trainer for the lstm model: Copy and Repeat Copy with the curriculum, and
character-level language modelling, by truncated BPTT with (dni) or without (backprop) synthetic
gradients at the segment boundaries.

A step is one batch of episodes (copy, repeat_copy: the core starts each from a zero state) or one
segment of T characters on every text stream (charlm: the state runs on across steps). The core is
updated after every segment in both. metrics.jsonl and summary.json follow the feed-forward runs;
the summary adds ``bptt``, ``longest_solved`` and ``final_length`` (copy tasks), ``test_bpc``
(charlm).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decoupled.config import Config
from decoupled.metrics import RunLog, build_summary, steady_samples_per_s, summary_stage_figures
from decoupled.optim import build_optimizer
from decoupled.recurrent import text
from decoupled.recurrent.model import LSTMCore
from decoupled.recurrent.tasks import LN2, CopyTask, Curriculum
from decoupled.recurrent.tbptt import SegmentStats, TBPTTLearner, sequence_loss
from decoupled.stage import NonFiniteError
from decoupled.synthesizer import MLPSynthesizer


def build_learner(cfg: Config, inputs: int, outputs: int) -> TBPTTLearner:
    """The core, and for dni its synthesizer (and auxiliary head), seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    core = LSTMCore(inputs, outputs, cfg.model.hidden, cfg.model.layers)
    params = list(core.parameters())
    synthesizer = sg_optimizer = aux_head = None
    if cfg.method.name == "dni":
        sg = cfg.method.sg
        synthesizer = MLPSynthesizer((core.state_size,), None, sg.layers, sg.hidden)
        sg_optimizer = torch.optim.Adam(synthesizer.parameters(), lr=sg.lr)
        if cfg.recurrent.aux_weight > 0:
            aux_head = nn.Linear(cfg.model.hidden, core.state_size)
            params += list(aux_head.parameters())
    return TBPTTLearner(
        core,
        build_optimizer(params, cfg.optim),
        synthesizer,
        sg_optimizer,
        sg_scale=cfg.method.sg.scale,
        aux_head=aux_head,
        aux_weight=cfg.recurrent.aux_weight if synthesizer is not None else 0.0,
    )


def total_steps(cfg: Config, train_length: int = 0) -> int:
    """train.steps, else (charlm only) train.epochs passes over the train streams."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    return cfg.train.epochs * max(train_length // cfg.model.bptt, 1)


class _Figures:
    """Running figures between two train records."""

    def __init__(self) -> None:
        self.loss_nats = 0.0
        self.counted = 0
        self.sg_loss: list[float] = []
        self.sg_cosine: list[float] = []

    def add(self, stats: SegmentStats) -> None:
        if not math.isfinite(stats.loss_sum):
            raise NonFiniteError(f"the training loss is {stats.loss_sum}")
        self.loss_nats += stats.loss_sum
        self.counted += stats.counted
        if stats.sg_loss is not None and stats.sg_cosine is not None:
            self.sg_loss.append(stats.sg_loss)
            self.sg_cosine.append(stats.sg_cosine)

    def record(self) -> dict[str, Any]:
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        bits = self.loss_nats / LN2 / self.counted if self.counted else None
        return {
            "train_loss": bits,
            "stage0/sg_loss": mean(self.sg_loss),
            **({"stage0/sg_cosine": mean(self.sg_cosine)} if self.sg_cosine else {}),
        }


def run_recurrent(cfg: Config, out_dir: Path | None) -> dict[str, Any]:
    """Train as configured; writes metrics.jsonl into ``out_dir`` and returns the summary."""
    # As a stage actor does: small recurrent steps lose time to extra threads on shared cores.
    torch.set_num_threads(max(1, int(cfg.runtime.cpus_per_stage)))
    if cfg.data.name == "charlm":
        return _CharLM(cfg, out_dir).run()
    return _CopyRun(cfg, out_dir).run()


def _segments(length: int, bptt: int) -> list[slice]:
    return [slice(start, min(start + bptt, length)) for start in range(0, length, bptt)]


class _CopyRun:
    def __init__(self, cfg: Config, out_dir: Path | None) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        rc = cfg.recurrent
        self.task = CopyTask(rc.alphabet, rc.repeats if cfg.data.name == "repeat_copy" else 0)
        self.learner = build_learner(cfg, self.task.inputs, self.task.outputs)
        self.curriculum = Curriculum(rc.start_length, rc.threshold, rc.window, rc.max_length)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def step(self) -> list[SegmentStats]:
        episode = self.task.episode(
            self.curriculum.length, self.cfg.data.batch_size, self.generator
        )
        self.learner.reset(self.cfg.data.batch_size)
        parts = _segments(episode.x.shape[0], self.cfg.model.bptt)
        out = [
            self.learner.segment(
                episode.x[s], episode.y[s], episode.mask[s], last=i == len(parts) - 1
            )
            for i, s in enumerate(parts)
        ]
        self.curriculum.record(sum(o.loss_sum for o in out), sum(o.counted for o in out))
        return out

    def run(self) -> dict[str, Any]:
        cfg, steps = self.cfg, total_steps(self.cfg)
        figures, last = _Figures(), dict[str, Any]()
        with RunLog(self.out_dir, steps, cfg.train.progress, cfg) as log:
            for seq in range(steps):
                for stats in self.step():
                    figures.add(stats)
                log.advance(1)
                if (seq + 1) % cfg.train.log_every == 0 or seq + 1 == steps:
                    last = {
                        "event": "train",
                        "step": seq + 1,
                        "samples": (seq + 1) * cfg.data.batch_size,
                        **figures.record(),
                        "length": self.curriculum.length,
                        "longest_solved": self.curriculum.solved,
                        "error_bits": self.curriculum.error,
                    }
                    log.write(last)
                    figures = _Figures()
            wall_s = log.wall_s()
            progress = log.progress
        summary = _summary(
            cfg,
            steps,
            wall_s,
            progress,
            last,
            {
                "longest_solved": self.curriculum.solved,
                "final_length": self.curriculum.length,
                "final_error_bits": self.curriculum.error,
            },
        )
        log.finish(summary)
        return summary


class _CharLM:
    def __init__(self, cfg: Config, out_dir: Path | None) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        codes = text.encode(text.load_corpus(cfg.data.root, cfg.data.download))
        self.train, self.held_out = text.split(codes)
        self.streams = text.streams(self.train, cfg.data.batch_size)
        self.learner = build_learner(cfg, text.VOCAB, text.VOCAB)
        self.position = 0

    def step(self) -> SegmentStats:
        bptt, length = self.cfg.model.bptt, self.streams.shape[0] - 1
        if self.position + bptt > length:
            # A new pass over the text: the streams jump back, so the state starts afresh.
            self.position = 0
            self.learner.reset(self.cfg.data.batch_size)
        x = self.streams[self.position : self.position + bptt]
        y = self.streams[self.position + 1 : self.position + bptt + 1]
        self.position += bptt
        one_hot = nn.functional.one_hot(x, text.VOCAB).float()
        return self.learner.segment(one_hot, y, torch.ones_like(y, dtype=torch.bool))

    def evaluate(self) -> float:
        """Bits per character on the held-out text, read as one stream in chunks."""
        return held_out_bpc(self.learner.core, self.held_out, self.cfg.recurrent.eval_chars)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        steps = total_steps(cfg, self.streams.shape[0] - 1)
        eval_every = cfg.train.eval_every or steps
        figures, last, bpc = _Figures(), dict[str, Any](), None
        with RunLog(self.out_dir, steps, cfg.train.progress, cfg) as log:
            for seq in range(steps):
                figures.add(self.step())
                log.advance(1)
                if (seq + 1) % cfg.train.log_every == 0 or seq + 1 == steps:
                    last = {
                        "event": "train",
                        "step": seq + 1,
                        "samples": (seq + 1) * cfg.data.batch_size,
                        **figures.record(),
                    }
                    log.write(last)
                    figures = _Figures()
                if (seq + 1) % eval_every == 0 or seq + 1 == steps:
                    bpc = self.evaluate()
                    log.write({"event": "eval", "step": seq + 1, "test_bpc": bpc})
            wall_s = log.wall_s()
            progress = log.progress
        summary = _summary(cfg, steps, wall_s, progress, last, {"test_bpc": bpc})
        log.finish(summary)
        return summary


@torch.no_grad()
def held_out_bpc(core: LSTMCore, codes: torch.Tensor, limit: int = 0, chunk: int = 256) -> float:
    """Bits per character of ``core`` predicting each next character of ``codes`` (N,) from the
    ones before it, the state running through the whole text; ``limit``: score only the first
    ``limit`` characters (0 = all)."""
    if limit:
        codes = codes[: limit + 1]
    state = core.initial_state(1)
    nats, counted = 0.0, 0
    for start in range(0, codes.numel() - 1, chunk):
        x = codes[start : start + chunk]
        y = codes[start + 1 : start + chunk + 1]
        x = x[: y.numel()]
        logits, _, state = core(nn.functional.one_hot(x, text.VOCAB).float()[:, None], state)
        nats += float(
            sequence_loss(logits, y[:, None], torch.ones_like(y[:, None], dtype=torch.bool))
        )
        counted += y.numel()
    return nats / counted / LN2


def _summary(
    cfg: Config,
    steps: int,
    wall_s: float,
    progress: list[tuple[int, float]],
    last: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    batch = cfg.data.batch_size
    stage = summary_stage_figures(
        {
            "index": 0,
            "steps": steps,
            "samples_per_s": steps * batch / wall_s if wall_s > 0 else None,
            "busy_fraction": 1.0,
            "sg_loss": last.get("stage0/sg_loss"),
            "sg_cosine": last.get("stage0/sg_cosine"),
        }
    )
    return build_summary(
        cfg,
        num_stages=1,
        steps=steps,
        wall_s=wall_s,
        samples=steps * batch,
        train_loss=last.get("train_loss"),
        test_accuracy=None,
        stages=[stage],
        steady_samples_per_s=steady_samples_per_s(progress, 0, steps, batch),
        extra={"bptt": cfg.model.bptt, **extra},
    )
