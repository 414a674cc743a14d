"""The in-process trainer for the lstm model: Copy and Repeat Copy with the curriculum, and
character-level language modelling, by truncated BPTT with (dni) or without (backprop) synthetic
gradients at the segment boundaries.

A step is one batch of episodes (copy, repeat_copy: the core starts each from a zero state) or one
segment of T characters on every text stream (charlm: the state runs on across steps). The core is
updated after every segment in both. metrics.jsonl and summary.json follow the feed-forward runs;
the summary adds ``bptt``, ``longest_solved`` and ``final_length`` (copy tasks), ``test_bpc``
(charlm). Checkpoints, ``--resume`` and Ctrl-C work as for the feed-forward runs
(``RecurrentRun``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decoupled.checkpoint import Cut, commit_cut, load_stage, save_stage
from decoupled.config import Config, config_to_dict
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.metrics import RunLog, build_summary, steady_samples_per_s, summary_stage_figures
from decoupled.optim import build_optimizer, build_synthesizer_optimizer
from decoupled.recurrent import text
from decoupled.recurrent.model import LSTMCore
from decoupled.recurrent.tasks import LN2, CopyTask, Curriculum
from decoupled.recurrent.tbptt import SegmentStats, TBPTTLearner, sequence_loss
from decoupled.schedule import Schedule
from decoupled.stage import NonFiniteError, check_finite
from decoupled.synthesizer import MLPSynthesizer

# Where the one-core recurrent runs train: they never move to a GPU.
_HOST = torch.device("cpu")


def build_learner(cfg: Config, inputs: int, outputs: int) -> TBPTTLearner:
    """The core, and for dni its synthesizer (and auxiliary head), seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    core = LSTMCore(inputs, outputs, cfg.model.hidden, cfg.model.layers)
    params = list(core.parameters())
    synthesizer = sg_optimizer = aux_head = None
    if cfg.method.name == "dni":
        sg = cfg.method.sg
        synthesizer = MLPSynthesizer(
            (core.state_size,), None, sg.layers, sg.hidden, zero_start=sg.zero_start
        )
        sg_optimizer = build_synthesizer_optimizer(synthesizer.parameters(), sg.lr, cfg.optim)
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

    def add(self, stats: SegmentStats, seq: int) -> None:
        for what, value in (("training loss", stats.loss_sum), ("synthesizer loss", stats.sg_loss)):
            if value is not None and not math.isfinite(value):
                raise NonFiniteError(f"stage 0: non-finite {what} at step {seq}")
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


def run_recurrent(
    cfg: Config,
    out_dir: Path | None,
    resume: Cut | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Train as configured; writes metrics.jsonl (and checkpoints) into ``out_dir`` and returns
    the summary. ``resume``: continue from that cut; ``stop``: see ``RecurrentRun``."""
    return build_run(cfg, out_dir, resume, stop).run()


def build_run(
    cfg: Config,
    out_dir: Path | None,
    resume: Cut | None = None,
    stop: StopRequest | None = None,
) -> RecurrentRun:
    """The run of ``cfg``'s task, at the step of ``resume`` when given, stopped by ``stop``."""
    # As a stage actor does: small recurrent steps lose time to extra threads on shared cores.
    torch.set_num_threads(max(1, int(cfg.runtime.cpus_per_stage)))
    run: RecurrentRun = (
        CharLMRun(cfg, out_dir) if cfg.data.name == "charlm" else CopyRun(cfg, out_dir)
    )
    run.stop = stop or StopRequest()
    if resume is not None:
        run.load_state_dict(load_stage(resume, 0, _HOST))
        run.start_step = resume.step
    return run


def _segments(length: int, bptt: int) -> list[slice]:
    return [slice(start, min(start + bptt, length)) for start in range(0, length, bptt)]


class RecurrentRun:
    """The loop both recurrent tasks share: steps, train and eval records, and the checkpoint
    cuts (every ``checkpoint.every`` steps and at the end, in the feed-forward runs' format, as
    stage 0 of one). A cut holds everything the rest of the run depends on, so a resumed run
    ends with the weights of an uninterrupted one; it is written after the step's records, so
    the window of figures it holds is the one the next record continues.

    ``stop``: once its ``signum`` is set (Ctrl-C), the run writes a cut at the next step
    boundary and raises ``Interrupted``, as ``LocalTrainer`` does."""

    def __init__(self, cfg: Config, out_dir: Path | None, learner: TBPTTLearner) -> None:
        self.cfg, self.out_dir, self.learner = cfg, out_dir, learner
        self.checkpoints = out_dir / "checkpoints" if out_dir is not None else None
        self.stop = StopRequest()
        self.start_step = 0
        self.figures = _Figures()
        self.last: dict[str, Any] = {}  # the last train record

    # -- what a task defines ---------------------------------------------------------------
    def step(self) -> list[SegmentStats]:
        raise NotImplementedError

    def schedule(self) -> Schedule:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """Figures of the task for a train record."""
        return {}

    def evaluate(self) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def task_state(self) -> dict[str, Any]:
        return {}

    def load_task_state(self, state: dict[str, Any]) -> None:
        pass

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, schedule = self.cfg, self.schedule()
        steps, batch = schedule.total_steps, cfg.data.batch_size
        with RunLog(self.out_dir, steps, cfg.train.progress, cfg) as log:
            log.advance(0, position=self.start_step)
            for seq in range(self.start_step, steps):
                if self.stop.requested:
                    self._interrupt(seq)
                for stats in self.step():
                    self.figures.add(stats, seq)
                log.advance(1)
                if schedule.log_after(seq):
                    self.last = {
                        "event": "train",
                        "step": seq + 1,
                        "samples": (seq + 1) * batch,
                        **self.figures.record(),
                        **self.record(),
                    }
                    log.write(self.last)
                    self.figures = _Figures()
                if schedule.evaluate_after(seq):
                    evaluation = self.evaluate()
                    if evaluation:
                        log.write({"event": "eval", "step": seq + 1, **evaluation})
                if schedule.checkpoint_after(seq):
                    self.save_cut(seq + 1)
            wall_s = log.wall_s()
            progress = log.progress
        summary = _summary(cfg, steps, self.start_step, wall_s, progress, self.last, self.summary())
        log.finish(summary)
        return summary

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "learner": self.learner.state_dict(),
            "figures": vars(self.figures),
            "last": self.last,
            "task": self.task_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.figures = _Figures()
        vars(self.figures).update(state["figures"])
        self.last = dict(state["last"])
        self.load_task_state(state["task"])

    def save_cut(self, step: int) -> Path | None:
        """The run at ``step`` steps done, refused when a weight is no longer finite: a run that
        diverged stops with the last good cut on disk (``NonFiniteError``)."""
        if self.checkpoints is None:
            return None
        for name, tensor in self._weights():
            check_finite(tensor, name, 0, step)
        save_stage(self.checkpoints, step, 0, self.state_dict(), _HOST)
        cut = commit_cut(
            self.checkpoints, step, 1, config_to_dict(self.cfg), self.cfg.checkpoint.keep
        )
        return cut.path

    def _weights(self) -> list[tuple[str, torch.Tensor]]:
        parts = {
            "core": self.learner.core,
            "synthesizer": self.learner.synthesizer,
            "aux_head": self.learner.aux_head,
        }
        return [
            (f"{part} weight {name}", tensor)
            for part, module in parts.items()
            if module is not None
            for name, tensor in module.named_parameters()
        ]

    def _interrupt(self, seq: int) -> None:
        assert self.stop.signum is not None
        path = self.save_cut(seq)
        raise Interrupted(self.stop.signum, seq, str(path) if path else None)


class CopyRun(RecurrentRun):
    """Copy and Repeat Copy: a step is one batch of episodes from a zero state, the length set
    by the curriculum."""

    def __init__(self, cfg: Config, out_dir: Path | None) -> None:
        rc = cfg.recurrent
        self.task = CopyTask(rc.alphabet, rc.repeats if cfg.data.name == "repeat_copy" else 0)
        super().__init__(cfg, out_dir, build_learner(cfg, self.task.inputs, self.task.outputs))
        self.curriculum = Curriculum(rc.start_length, rc.threshold, rc.window, rc.max_length)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def schedule(self) -> Schedule:
        steps, train = total_steps(self.cfg), self.cfg.train
        return Schedule(steps, steps, steps, train.log_every, self.cfg.checkpoint.every)

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

    def record(self) -> dict[str, Any]:
        return {
            "length": self.curriculum.length,
            "longest_solved": self.curriculum.solved,
            "error_bits": self.curriculum.error,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "longest_solved": self.curriculum.solved,
            "final_length": self.curriculum.length,
            "final_error_bits": self.curriculum.error,
        }

    def task_state(self) -> dict[str, Any]:
        return {"curriculum": self.curriculum.state_dict(), "episodes": self.generator.get_state()}

    def load_task_state(self, state: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(state["curriculum"])
        self.generator.set_state(state["episodes"])


class CharLMRun(RecurrentRun):
    """Character-level language modelling: a step is the next T characters of every stream,
    the state running on across steps (and starting afresh with each pass over the text)."""

    def __init__(self, cfg: Config, out_dir: Path | None) -> None:
        super().__init__(cfg, out_dir, build_learner(cfg, text.VOCAB, text.VOCAB))
        codes = text.encode(text.load_corpus(cfg.data.root, cfg.data.download))
        self.train, self.held_out = text.split(codes)
        self.streams = text.streams(self.train, cfg.data.batch_size)
        self.position = 0
        self.bpc: float | None = None

    def schedule(self) -> Schedule:
        length, train = self.streams.shape[0] - 1, self.cfg.train
        steps = total_steps(self.cfg, length)
        return Schedule(
            total_steps=steps,
            steps_per_epoch=max(length // self.cfg.model.bptt, 1),
            eval_every=train.eval_every or steps,
            log_every=train.log_every,
            checkpoint_every=self.cfg.checkpoint.every,
        )

    def step(self) -> list[SegmentStats]:
        bptt, length = self.cfg.model.bptt, self.streams.shape[0] - 1
        if self.position + bptt > length:
            # A new pass over the text: the streams jump back, so the state starts afresh.
            self.position = 0
            self.learner.reset(self.cfg.data.batch_size)
        x = self.streams[self.position : self.position + bptt]
        y = self.streams[self.position + 1 : self.position + bptt + 1]
        self.position += bptt
        one_hot = nn.functional.one_hot(x, text.VOCAB).float()
        return [self.learner.segment(one_hot, y, torch.ones_like(y, dtype=torch.bool))]

    def evaluate(self) -> dict[str, Any]:
        """Bits per character on the held-out text, read as one stream in chunks."""
        self.bpc = held_out_bpc(self.learner.core, self.held_out, self.cfg.recurrent.eval_chars)
        return {"test_bpc": self.bpc}

    def summary(self) -> dict[str, Any]:
        return {"test_bpc": self.bpc}

    def task_state(self) -> dict[str, Any]:
        return {"position": self.position, "bpc": self.bpc}

    def load_task_state(self, state: dict[str, Any]) -> None:
        self.position, self.bpc = int(state["position"]), state["bpc"]


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
    first_step: int,
    wall_s: float,
    progress: list[tuple[int, float]],
    last: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    # Rates over the steps this process ran (a resumed run: from its cut on).
    batch, ran = cfg.data.batch_size, steps - first_step
    stage = summary_stage_figures(
        {
            "index": 0,
            "steps": steps,
            "samples_per_s": ran * batch / wall_s if wall_s > 0 else None,
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
        samples=ran * batch,
        train_loss=last.get("train_loss"),
        test_accuracy=None,
        stages=[stage],
        steady_samples_per_s=steady_samples_per_s(progress, first_step, steps, batch),
        extra={"bptt": cfg.model.bptt, **extra},
    )
