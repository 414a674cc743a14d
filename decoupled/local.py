"""In-process trainer: every stage in one process, in sequence, with a configurable delay.

It drives the same ``MethodStage`` objects the Ray actors drive, through the same three events,
in a fixed order, so the asynchronous protocol can be studied deterministically. Backward
messages a stage's step waits for (``backward_due``: GPipe's gradients) are handed over at once;
the others travel through a ``DelayLine``: sent during step s, received after step
s + ``method.delay``. With delay 0 and a perfect synthesizer DNI is exactly backprop.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from decoupled.balance import balanced, summary_figures
from decoupled.build import build_stages
from decoupled.channel import BackwardMessage, DelayLine
from decoupled.checkpoint import Cut, commit_cut, load_stage, save_stage
from decoupled.config import Config, ConfigError, config_to_dict
from decoupled.data import Batch, Data, describe, eval_source, train_stream
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.methods import MethodStage, Sends, method_for
from decoupled.metrics import (
    RunLog,
    build_summary,
    stage_record,
    steady_samples_per_s,
    summary_stage_figures,
)
from decoupled.runner import stage_summary_figures
from decoupled.schedule import Schedule
from decoupled.stage import correct_predictions, cross_entropy


def local_device(gpus_per_stage: float | str) -> torch.device:
    """Where the in-process stages run: all on cuda:0 for any GPU share ("auto": when this
    process sees a GPU), else on the host."""
    if gpus_per_stage == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if float(gpus_per_stage) == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"runtime.gpus_per_stage: {gpus_per_stage} asks for a GPU and this process sees "
            "none (0 runs on the host; 'auto' uses a GPU when there is one)"
        )
    return torch.device("cuda:0")


def evaluate(stages: list[MethodStage], batches: Iterable[Batch]) -> dict[str, float]:
    """Test-split loss and accuracy (per prediction: per sample, or per token) through the
    stages in order (batch-norm in inference mode)."""
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in batches:
        h = x
        for stage in stages:
            h = stage.evaluate(h)
        y = y.to(h.device)
        loss_sum += float(cross_entropy(h, y, reduction="sum"))
        correct += correct_predictions(h, y)
        seen += y.numel()  # predictions: per sample, or per token
    return {"test_loss": loss_sum / seen, "test_accuracy": correct / seen}


class LocalTrainer:
    def __init__(
        self,
        cfg: Config,
        dataset: Data,
        out_dir: Path | None = None,
        resume: Cut | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        info = describe(dataset)
        self.cfg, self.balance = balanced(cfg, info.input_shape, info.num_classes, resume=resume)
        cfg = self.cfg
        self.test_batches = eval_source(dataset, cfg.data, cfg.seed)
        self.out_dir = out_dir
        self.checkpoints = out_dir / "checkpoints" if out_dir is not None else None
        self.stop = stop or StopRequest()
        device = local_device(cfg.runtime.gpus_per_stage)
        self.stages = build_stages(cfg, info.input_shape, info.num_classes, device)
        self.start_step = 0
        if resume is not None:
            for stage in self.stages:
                stage.load_state_dict(load_stage(resume, stage.index, stage.device))
            self.start_step = resume.step
        self.stream = train_stream(dataset, cfg.data, cfg.seed)
        self.schedule = Schedule.from_config(
            cfg.train, self.stream.steps_per_epoch, cfg.checkpoint.every
        )
        for stage in self.stages:
            stage.stage.optimizer.set_total(self.schedule.total_steps)
        method = method_for(cfg)
        self.micro_batches = method.micro_batches()
        self.probe_every = method.probe_every()
        self.backward = DelayLine(cfg.method.delay)

    def step(self, seq: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Batch ``seq``: each micro-batch through every stage, the end of the step everywhere,
        then the backward messages that are due, oldest first."""
        step, m = seq, self.micro_batches
        for j, (xm, ym) in enumerate(zip(x.chunk(m), y.chunk(m), strict=True)):
            seq, h = step * m + j, xm
            for stage in self.stages:
                sends = stage.forward(seq, h, ym)
                if sends.backward is not None:
                    self._send_back(step, stage.index - 1, BackwardMessage(seq, sends.backward))
                if sends.forward is not None:
                    h = sends.forward
        for stage in self.stages:
            stage.end_step()
        while (due := self.backward.due(step)) is not None:
            self._deliver(step, *due)
        if self.probe_every and (step + 1) % self.probe_every == 0:
            self.probe(step + 1, x, y)

    def idle(self, index: int) -> bool:
        """Stage ``index`` (after the first) finds no new input between two steps, as when its
        producer is slower: its ``idle`` event, here at a moment the caller chooses; whether
        it did work meanwhile (dgl's replay)."""
        if index < 1:
            raise ValueError("stage 0 reads the data: it never waits for input")
        return self.stages[index].idle()

    def probe(self, seq: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """The exact gradient of batch (x, y) at every boundary, compared by each stage with
        its synthetic gradient; nothing is updated."""
        sends = Sends(forward=x)
        for stage in self.stages:
            assert sends.forward is not None
            sends = stage.probe_forward(seq, sends.forward, y)
        for stage in reversed(self.stages[:-1]):
            if sends.backward is None:
                break
            sends = stage.probe_backward(seq, sends.backward)

    def _send_back(self, step: int, index: int, message: BackwardMessage) -> None:
        if self.stages[index].backward_due():  # its step cannot end without it
            self._deliver(step, index, message)
        else:
            self.backward.send(step, index, message)

    def _deliver(self, step: int, index: int, message: BackwardMessage) -> None:
        sends = self.stages[index].backward(message.seq, message.target)
        if sends.backward is not None:
            self._send_back(step, index - 1, BackwardMessage(message.seq, sends.backward))

    def run(self) -> dict[str, Any]:
        schedule = self.schedule
        batch = self.cfg.data.batch_size
        last_train_loss: float | None = None
        test: dict[str, float] = {}
        with RunLog(self.out_dir, schedule.total_steps, self.cfg.train.progress, self.cfg) as log:
            log.advance(0, position=self.start_step)
            for seq in range(self.start_step, schedule.total_steps):
                if self.stop.requested:
                    self._interrupt(seq)
                x, y = self.stream.batch(seq)
                self.step(seq, x, y)
                log.advance(1)
                if schedule.checkpoint_after(seq):
                    self.save_cut(seq + 1)
                if schedule.log_after(seq):
                    record = self._train_record(seq, log.wall_s())
                    last_train_loss = record.get("train_loss", last_train_loss)
                    log.write(record)
                if schedule.evaluate_after(seq):
                    test = evaluate(self.stages, self.test_batches())
                    log.write(
                        {
                            "event": "eval",
                            "step": seq + 1,
                            "samples": (seq + 1) * batch,
                            "epoch": schedule.epoch(seq),
                            **test,
                        }
                    )
            wall_s = log.wall_s()
            progress = log.progress
        summary = build_summary(
            self.cfg,
            num_stages=len(self.stages),
            steps=schedule.total_steps,
            wall_s=wall_s,
            samples=(schedule.total_steps - self.start_step) * batch,
            train_loss=last_train_loss,
            test_accuracy=test.get("test_accuracy"),
            stages=[self._stage_figures(stage, wall_s) for stage in self.stages],
            steady_samples_per_s=steady_samples_per_s(
                progress, self.start_step, schedule.total_steps, batch
            ),
            extra={"test_loss": test.get("test_loss"), **summary_figures(self.balance)},
        )
        log.finish(summary)
        return summary

    def save_cut(self, step: int) -> Path | None:
        """Every stage at ``step`` steps done; targets still pending are dropped from the cut."""
        if self.checkpoints is None:
            return None
        for stage in self.stages:
            save_stage(self.checkpoints, step, stage.index, stage.state_dict(), stage.device)
        cut = commit_cut(
            self.checkpoints,
            step,
            len(self.stages),
            config_to_dict(self.cfg),
            self.cfg.checkpoint.keep,
        )
        return cut.path

    def _interrupt(self, seq: int) -> None:
        assert self.stop.signum is not None
        path = self.save_cut(seq)
        raise Interrupted(self.stop.signum, seq, str(path) if path else None)

    def _train_record(self, seq: int, wall_s: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "event": "train",
            "step": seq + 1,
            "samples": (seq + 1) * self.cfg.data.batch_size,
            "epoch": self.schedule.epoch(seq),
            "samples_per_s": (seq + 1 - self.start_step) * self.cfg.data.batch_size / wall_s,
        }
        for stage in self.stages:
            figures = stage.stats.snapshot()
            if stage.is_last:
                record["train_loss"] = figures["train_loss"]
                record["train_accuracy"] = figures["train_accuracy"]
            figures["busy_fraction"] = stage.stats.compute_s / wall_s
            if stage.stats.staleness_counts:
                figures["staleness_counts"] = dict(stage.stats.staleness_counts)
            record.update(stage_record(stage.index, figures))
        return record

    @staticmethod
    def _stage_figures(stage: MethodStage, wall_s: float) -> dict[str, Any]:
        extra = {"input_wait_s": 0.0, "targets_dropped": 0}
        return summary_stage_figures(stage_summary_figures(stage, wall_s, extra))
