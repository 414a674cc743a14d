"""In-process trainer: every stage in one process, in sequence, with a configurable target delay.

It runs the same ``Stage`` code the Ray actors run, in a fixed order, so the asynchronous protocol
can be studied deterministically: a target computed at step s is delivered to the previous stage
after step s + ``method.delay``. With delay 0 and a perfect synthesizer this is exactly backprop.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from decoupled.build import build_stages
from decoupled.checkpoint import Cut, commit_cut, load_stage, save_stage
from decoupled.config import Config, config_to_dict
from decoupled.data import Dataset, TrainStream, eval_batches
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.metrics import (
    RunLog,
    build_summary,
    stage_record,
    steady_samples_per_s,
    summary_stage_figures,
)
from decoupled.schedule import Schedule
from decoupled.stage import Stage


def evaluate(stages: list[Stage], dataset: Dataset, batch_size: int) -> dict[str, float]:
    """Test-split loss and accuracy through the stages in order (batch-norm in inference mode)."""
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in eval_batches(dataset.test_x, dataset.test_y, batch_size):
        h = x
        for stage in stages:
            h = stage.evaluate(h)
        y = y.to(h.device)
        loss_sum += float(F.cross_entropy(h, y, reduction="sum"))
        correct += int((h.argmax(1) == y).sum())
        seen += y.shape[0]
    return {"test_loss": loss_sum / seen, "test_accuracy": correct / seen}


class LocalTrainer:
    def __init__(
        self,
        cfg: Config,
        dataset: Dataset,
        out_dir: Path | None = None,
        resume: Cut | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.out_dir = out_dir
        self.checkpoints = out_dir / "checkpoints" if out_dir is not None else None
        self.stop = stop or StopRequest()
        self.stages = build_stages(cfg, dataset.input_shape, dataset.num_classes)
        self.start_step = 0
        if resume is not None:
            for stage in self.stages:
                stage.load_state_dict(load_stage(resume, stage.index, stage.device))
            self.start_step = resume.step
        self.stream = TrainStream(dataset.train_x, dataset.train_y, cfg.data.batch_size, cfg.seed)
        self.schedule = Schedule.from_config(
            cfg.train, self.stream.steps_per_epoch, cfg.checkpoint.every
        )
        # (deliver after step, stage that receives it, seq, target)
        self._pending: deque[tuple[int, int, int, torch.Tensor]] = deque()

    def step(self, seq: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One batch through every stage; due targets are then delivered, oldest first."""
        if self.cfg.method.name == "pipeline":
            self._pipeline_step(seq, x, y)
            return
        h = x
        for stage in self.stages:
            result = stage.train_step(seq, h, y)
            if result.target is not None:
                self._pending.append(
                    (seq + self.cfg.method.delay, stage.index - 1, seq, result.target)
                )
            if result.activations is not None:
                h = result.activations
        while self._pending and self._pending[0][0] <= seq:
            _, index, target_seq, target = self._pending.popleft()
            self.stages[index].train_synthesizer(target_seq, target)

    def _pipeline_step(self, seq: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """GPipe in one process: all micro-batches forward, all backward, one update per stage."""
        m = self.cfg.method.micro_batches
        for micro, (xm, ym) in enumerate(zip(x.chunk(m), y.chunk(m), strict=True)):
            h: torch.Tensor | None = xm
            grad: torch.Tensor | None = None
            for stage in self.stages:
                assert h is not None
                result = stage.forward_hold(micro, h, ym, m)
                h, grad = result.activations, result.target
            for stage in reversed(self.stages[:-1]):
                assert grad is not None
                grad = stage.backward_held(micro, grad)
        for stage in self.stages:
            stage.apply_update()

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
                    test = evaluate(self.stages, self.dataset, self.cfg.data.eval_batch_size)
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
            extra={"test_loss": test.get("test_loss")},
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
    def _stage_figures(stage: Stage, wall_s: float) -> dict[str, Any]:
        stats = stage.stats
        return summary_stage_figures(
            {
                "index": stage.index,
                "steps": stats.steps,
                "samples_per_s": stats.samples / wall_s if wall_s > 0 else None,
                "busy_fraction": stats.compute_s / wall_s if wall_s > 0 else None,
                "input_wait_s": 0.0,
                "targets_dropped": 0,
                **stats.run_figures(),
                "device": str(stage.device),
            }
        )
