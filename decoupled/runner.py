"""A stage's compute loop over channels: what runs on a stage actor's compute thread.

It owns no transport and no Ray: it reads forward messages (or, at stage 0, the data stream),
runs the ``Stage``, sends activations on and targets back, and applies targets as they arrive.
The same loop runs over in-process channels in the tests and over Ray or torch.distributed
channels in the actors.

Message order per stage is the schedule: every stage sees TRAIN step s, then (at an evaluation
point) the test set as EVAL batches, then TRAIN step s + 1. So an evaluation after step s runs on
exactly the parameters each stage had after step s, however asynchronous the run.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from decoupled.channel import (
    BackwardMessage,
    ChannelClosed,
    ForwardMessage,
    Kind,
    Message,
    Receiver,
    Sender,
)
from decoupled.data import TrainStream, eval_batches
from decoupled.schedule import Schedule
from decoupled.stage import Stage

POLL_S = 0.05  # how long a blocked receive waits before re-checking the stop flag
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0


def resident_mb() -> float | None:
    """This process's resident memory now (Linux), for the flat-memory checks."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_MB
    except OSError:
        return None


_nvml_missing = False  # torch.cuda.utilization needs pynvml; without it, ask only once


def gpu_figures(device: torch.device) -> dict[str, float]:
    """Memory this process holds on ``device`` (MB, now and peak) and the device's utilisation
    (%, over the driver's last sample period) when pynvml is installed."""
    global _nvml_missing
    figures = {
        "gpu_mem_mb": torch.cuda.memory_allocated(device) / 2**20,
        "gpu_max_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20,
    }
    if not _nvml_missing:
        try:
            figures["gpu_util"] = float(torch.cuda.utilization(device))
        except Exception:  # ModuleNotFoundError without pynvml; NVML errors on odd drivers
            _nvml_missing = True
    return figures


@dataclass
class RunnerSettings:
    method: str  # dni | cdni | pipeline | backprop
    schedule: Schedule
    micro_batches: int = 1
    # Wait for the target of step s before step s + 1: one batch in flight, deterministic.
    lockstep: bool = False
    send_timeout_s: float = 600.0


@dataclass
class EvalTally:
    step: int
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0

    def result(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "test_loss": self.loss_sum / self.seen,
            "test_accuracy": self.correct / self.seen,
        }


@dataclass
class RunnerFigures:
    """What the loop measures around the stage: waiting, queue depths, targets dropped."""

    input_wait_s: float = 0.0
    target_wait_s: float = 0.0
    depth_sum: int = 0
    depth_samples: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)


class StageRunner:
    """Runs one stage to the end of the schedule. ``run()`` blocks; ``start()`` runs it on a
    thread. Data sources: ``stream`` and ``test`` at stage 0, ``forward_in`` elsewhere."""

    def __init__(
        self,
        stage: Stage,
        settings: RunnerSettings,
        *,
        forward_in: Receiver | None = None,
        forward_out: Sender | None = None,
        backward_in: Receiver | None = None,
        backward_out: Sender | None = None,
        stream: TrainStream | None = None,
        test: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        num_test_samples: int = 0,
        start_step: int = 0,
        dropped_targets: Callable[[], int] = lambda: 0,
        save: Callable[[int], None] | None = None,
    ) -> None:
        self.stage = stage
        self.settings = settings
        self.forward_in, self.forward_out = forward_in, forward_out
        self.backward_in, self.backward_out = backward_in, backward_out
        self.stream, self.test = stream, test
        self.num_test_samples = num_test_samples  # the last stage knows a round is complete
        self.step = start_step  # next training step to run
        self.dropped_targets = dropped_targets
        self.figures = RunnerFigures()
        # save(step) writes this stage's part of the cut at ``step``; None: no checkpoints.
        self.save = save
        self.saved: list[int] = []
        self._checkpoint_requested = threading.Event()
        self.error: str | None = None
        self.error_kind: str | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._eval: EvalTally | None = None
        self.started_at = time.perf_counter()

    # -- control (called from other threads) -------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.run, name=f"stage{self.stage.index}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def request_checkpoint(self) -> None:
        """Stage 0: start a cut after the step in progress (on Ctrl-C, before stopping)."""
        self._checkpoint_requested.set()

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done.is_set()

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        self.started_at = time.perf_counter()
        try:
            if self.settings.method == "pipeline":
                self._run_pipeline()
            else:
                self._run_unlocked()
        except ChannelClosed as err:
            if not self._stop.is_set():
                self.error = f"stage {self.stage.index}: a channel closed before the end"
                self.error_kind = type(err).__name__
        except Exception as err:  # reported to the controller, which decides
            self.error = traceback.format_exc()
            self.error_kind = type(err).__name__
        finally:
            self.done.set()

    def _run_unlocked(self) -> None:
        """DNI/cDNI (and single-stage backprop): update at once, apply targets as they come."""
        stage, total = self.stage, self.settings.schedule.total_steps
        for message in self._train_inputs(between=lambda: self._apply_targets(wait_for=None)):
            result = stage.train_step(message.seq, message.activations, message.labels)
            if result.activations is not None:
                self._send_forward(
                    ForwardMessage(message.seq, Kind.TRAIN, result.activations, message.labels)
                )
            if result.target is not None and self.backward_out is not None:
                self.backward_out.send(BackwardMessage(message.seq, result.target))
            self.step = message.seq + 1
            if self.settings.lockstep and self.backward_in is not None:
                self._apply_targets(wait_for=message.seq)
            if stage.is_first:
                self._after_step(message.seq, total)

    def _run_pipeline(self) -> None:
        """GPipe with a flush: all micro-batches forward, all backward, then one update.

        A stage starts on each micro-batch as soon as it arrives, so stage k + 1 computes
        micro-batch i while stage k computes micro-batch i + 1."""
        stage, m = self.stage, self.settings.micro_batches
        for message in self._train_inputs():
            step = message.seq if stage.is_first else self.step
            micro_batches = (
                zip(message.activations.chunk(m), message.labels.chunk(m), strict=True)
                if stage.is_first
                else self._arriving_micro_batches(message, m)
            )
            for micro, (x, y) in enumerate(micro_batches):
                result = stage.forward_hold(micro, x, y, m)
                if result.activations is not None:
                    self._send_forward(ForwardMessage(micro, Kind.TRAIN, result.activations, y))
                if result.target is not None and self.backward_out is not None:
                    self.backward_out.send(BackwardMessage(micro, result.target))
            if not stage.is_last:
                for _ in range(m):
                    target = self._recv_target()
                    grad = stage.backward_held(target.seq, target.target)
                    if grad is not None and self.backward_out is not None:
                        self.backward_out.send(BackwardMessage(target.seq, grad))
            stage.apply_update()
            self.step = step + 1
            if stage.is_first:
                self._after_step(step, self.settings.schedule.total_steps)

    def _arriving_micro_batches(
        self, first: ForwardMessage, m: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``first`` and the batch's other m - 1 micro-batches, each as soon as it arrives."""
        yield first.activations, first.labels
        for _ in range(m - 1):
            message = self._next_input()
            while message is None:
                if self._stop.is_set():
                    raise ChannelClosed("stopped in the middle of a batch")
                message = self._next_input()
            if message.kind is not Kind.TRAIN:
                # Stage 0 emits markers, evaluations and STOP only between whole batches.
                raise RuntimeError(
                    f"stage {self.stage.index}: {message.kind.name} message inside a batch"
                )
            yield message.activations, message.labels

    def _train_inputs(self, between: Callable[[], None] = lambda: None) -> Iterator[ForwardMessage]:
        """The TRAIN messages in order, with the STOP, EVAL and CHECKPOINT messages between them
        handled here; ends at STOP or ``stop()``. ``between`` runs before every receive."""
        while not self._stop.is_set():
            between()
            message = self._next_input()
            if message is None:
                continue
            if message.kind is Kind.TRAIN:
                yield message
            elif self._control(message):
                return

    def _control(self, message: ForwardMessage) -> bool:
        """Handle a STOP, EVAL or CHECKPOINT message; True when the loop must end (STOP)."""
        if message.kind is Kind.STOP:
            self._send_forward(message)
            return True
        if message.kind is Kind.EVAL:
            self._evaluate(message)
        elif message.kind is Kind.CHECKPOINT:
            self._checkpoint(message.seq)
        return False

    # -- pieces ------------------------------------------------------------------------------
    def _next_input(self) -> ForwardMessage | None:
        """Stage 0 reads the stream; the others wait (briefly, to re-check stop) for a message."""
        if self.stage.is_first:
            if self.step >= self.settings.schedule.total_steps:
                return ForwardMessage(self.step, Kind.STOP, torch.empty(0), torch.empty(0))
            assert self.stream is not None
            x, y = self.stream.batch(self.step)
            return ForwardMessage(self.step, Kind.TRAIN, x, y)
        assert self.forward_in is not None
        self._sample_depth()
        start = time.perf_counter()
        message = self.forward_in.recv(timeout=POLL_S)
        self.figures.input_wait_s += time.perf_counter() - start
        assert message is None or isinstance(message, ForwardMessage)
        return message

    def _send_forward(self, message: ForwardMessage) -> None:
        if self.forward_out is not None:
            self.forward_out.send(message, timeout=self.settings.send_timeout_s)

    def _recv_target(self) -> BackwardMessage:
        assert self.backward_in is not None
        start = time.perf_counter()
        try:
            while not self._stop.is_set():
                message = self.backward_in.recv(timeout=POLL_S)
                if message is not None:
                    assert isinstance(message, BackwardMessage)
                    return message
            raise ChannelClosed("stopped while waiting for a target")
        finally:
            self.figures.target_wait_s += time.perf_counter() - start

    def _apply_targets(self, wait_for: int | None) -> None:
        """Train the synthesizer on every target that has arrived; with ``wait_for``, block
        until the target of that step has been applied (lockstep)."""
        if self.backward_in is None or self.stage.synthesizer is None:
            return
        while True:
            if wait_for is not None:
                message: Message | None = self._recv_target()
            else:
                message = self.backward_in.recv(timeout=0)
            if message is None:
                return
            assert isinstance(message, BackwardMessage)
            self.stage.train_synthesizer(message.seq, message.target)
            if wait_for is not None and message.seq >= wait_for:
                return

    def _after_step(self, seq: int, total: int) -> None:
        """Stage 0: a checkpoint marker and, at an evaluation point, the test set follow the
        training batch."""
        schedule = self.settings.schedule
        if self._checkpoint_requested.is_set() or schedule.checkpoint_after(seq):
            self._checkpoint_requested.clear()
            self._checkpoint(seq + 1)
        if not schedule.evaluate_after(seq) or self.test is None:
            return
        x, y, batch_size = self.test
        for x_b, y_b in eval_batches(x, y, batch_size):
            self._evaluate(ForwardMessage(seq + 1, Kind.EVAL, x_b, y_b))

    def _checkpoint(self, step: int) -> None:
        """Save this stage's part of the cut at ``step``, then pass the marker on."""
        if self.save is None:
            return
        self.save(step)
        self.saved.append(step)
        empty = torch.empty(0)
        self._send_forward(ForwardMessage(step, Kind.CHECKPOINT, empty, empty))

    def _evaluate(self, message: ForwardMessage) -> None:
        out = self.stage.evaluate(message.activations)
        if not self.stage.is_last:
            self._send_forward(ForwardMessage(message.seq, Kind.EVAL, out, message.labels))
            return
        if self._eval is None or self._eval.step != message.seq:
            self._eval = EvalTally(message.seq)
        labels = message.labels.to(out.device)
        tally = self._eval
        tally.loss_sum += float(F.cross_entropy(out, labels, reduction="sum"))
        tally.correct += int((out.argmax(1) == labels).sum())
        tally.seen += labels.shape[0]
        if self._eval_complete(tally):
            self.figures.evals.append(tally.result())
            self._eval = None

    def _eval_complete(self, tally: EvalTally) -> bool:
        return self.num_test_samples > 0 and tally.seen >= self.num_test_samples

    def _sample_depth(self) -> None:
        if self.forward_in is not None:
            self.figures.depth_sum += self.forward_in.depth()
            self.figures.depth_samples += 1

    # -- figures -----------------------------------------------------------------------------
    def poll(self) -> dict[str, Any]:
        """Figures since the last poll, and evaluation results finished since then.

        Called from the control thread while the loop runs: it only reads counters and swaps
        lists, so a stale-by-one value is possible and harmless."""
        stats = self.stage.stats.snapshot()
        evals, self.figures.evals = self.figures.evals, []
        saved, self.saved = self.saved, []
        return {
            "index": self.stage.index,
            "step": self.step,
            "done": self.done.is_set(),
            "error": self.error,
            "error_kind": self.error_kind,
            "evals": evals,
            "saved": saved,
            **stats,
            **self._runner_figures(),
            **self._staleness_counts(),
        }

    def _staleness_counts(self) -> dict[str, Any]:
        """The whole run's staleness distribution (a few ints). ``dict()`` copies the Counter in
        one C call under the GIL, so the compute thread cannot change it mid-copy."""
        counts = dict(self.stage.stats.staleness_counts)
        return {"staleness_counts": counts} if counts else {}

    def final_figures(self) -> dict[str, Any]:
        stats = self.stage.stats
        wall = max(time.perf_counter() - self.started_at, 1e-9)
        return {
            "index": self.stage.index,
            "steps": stats.steps,
            "samples_per_s": stats.samples / wall,
            "busy_fraction": stats.compute_s / wall,
            **stats.run_figures(),
            **self._runner_figures(),
            "device": str(self.stage.device),
        }

    def _runner_figures(self) -> dict[str, Any]:
        f = self.figures
        return {
            "rss_mb": resident_mb(),
            "history": len(self.stage.history),
            "input_wait_s": f.input_wait_s,
            "target_wait_s": f.target_wait_s,
            "channel_depth": f.depth_sum / f.depth_samples if f.depth_samples else 0.0,
            "targets_dropped": self.dropped_targets(),
            **(gpu_figures(self.stage.device) if self.stage.device.type == "cuda" else {}),
        }
