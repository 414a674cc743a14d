"""A stage's compute loop over channels: what runs on a stage actor's compute thread.

It owns no transport, no Ray and no method: it reads forward messages (or, at stage 0, the data
stream), hands each event to the stage's ``MethodStage`` and sends on what that returns, and
hands backward messages over as they arrive. The same loop runs every method, over in-process
channels in the tests and over Ray or torch.distributed channels in the actors.

Message order per stage is the schedule: every stage sees TRAIN step s, then (at an evaluation
point) the test set as EVAL batches, then TRAIN step s + 1. So an evaluation after step s runs on
exactly the parameters each stage had after step s, however asynchronous the run.
"""

from __future__ import annotations

import enum
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from decoupled.channel import (
    BackwardMessage,
    ChannelClosed,
    ForwardMessage,
    Kind,
    Message,
    Receiver,
    Sender,
)
from decoupled.data import Batch, BatchStream
from decoupled.devices import gpu_figures
from decoupled.methods import MethodStage, Sends
from decoupled.schedule import Schedule
from decoupled.stage import NonFiniteError, correct_predictions, cross_entropy

POLL_S = 0.05  # how long a blocked receive waits before re-checking the stop flag
PROBE_WAIT_S = 10.0  # how long a finished stage waits for its last probe's exact gradient
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0.0


def resident_mb() -> float | None:
    """This process's resident memory now (Linux), for the flat-memory checks."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_MB
    except OSError:
        return None


@dataclass
class RunnerSettings:
    schedule: Schedule
    micro_batches: int = 1  # the method's: stage 0 cuts each batch into this many
    # Wait for the backward message of step s before step s + 1: one batch in flight,
    # deterministic (for methods whose stages expect one).
    lockstep: bool = False
    send_timeout_s: float = 600.0
    # Stage 0 sends a probe batch after every this many steps (0: never; see Kind.PROBE).
    probe_every: int = 0
    # How long a finished stage waits for its last probe's exact gradient. It must stay well
    # below the controller's stall timeout: a wait for a dropped probe is not progress.
    probe_wait_s: float = PROBE_WAIT_S


class ErrorKind(enum.Enum):
    """Why a stage's loop ended early; the controller decides on this, not on a message."""

    NON_FINITE = "non_finite"  # a NaN/inf: the same data would give it again, no retry
    CHANNEL_CLOSED = "channel_closed"  # a neighbour went away before the end
    EXCEPTION = "exception"  # anything else, with its traceback


@dataclass(frozen=True)
class StageError:
    kind: ErrorKind
    message: str


@dataclass(frozen=True)
class EvalResult:
    """The test-set figures of the parameters every stage had after ``step``."""

    step: int
    test_loss: float
    test_accuracy: float
    # time.time() when the last stage finished it: one clock for the whole run, so records
    # that reach the driver together keep the times the work was done.
    at: float


@dataclass(frozen=True)
class StagePoll:
    """What a stage reports to the controller at each poll."""

    index: int
    step: int  # the next training step it will run
    done: bool
    error: StageError | None
    evals: list[EvalResult]  # finished since the previous poll (last stage only)
    saved: list[int]  # steps of the cuts whose part this stage has written since then
    figures: dict[str, Any]  # the window's per-stage figures (metrics.PER_STAGE_KEYS and more)


@dataclass
class EvalTally:
    step: int
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0  # predictions: one per sample, or one per token
    samples: int = 0

    def result(self) -> EvalResult:
        seen = self.seen
        return EvalResult(self.step, self.loss_sum / seen, self.correct / seen, time.time())


@dataclass
class RunnerFigures:
    """What the loop measures around the stage: waiting, queue depths, targets dropped."""

    input_wait_s: float = 0.0
    target_wait_s: float = 0.0
    depth_sum: int = 0
    depth_samples: int = 0
    evals: list[EvalResult] = field(default_factory=list)


class StageRunner:
    """Runs one stage to the end of the schedule. ``run()`` blocks; ``start()`` runs it on a
    thread. Data sources: ``stream`` and ``test`` at stage 0, ``forward_in`` elsewhere."""

    def __init__(
        self,
        stage: MethodStage,
        settings: RunnerSettings,
        *,
        forward_in: Receiver | None = None,
        forward_out: Sender | None = None,
        backward_in: Receiver | None = None,
        backward_out: Sender | None = None,
        stream: BatchStream | None = None,
        test: Callable[[], Iterator[Batch]] | None = None,
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
        self.error: StageError | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._eval: EvalTally | None = None
        self._backward_seq = -1  # the newest micro-batch whose backward message was handled
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
            self._run()
        except ChannelClosed:
            if not self._stop.is_set():
                message = f"stage {self.stage.index}: a channel closed before the end"
                self.error = StageError(ErrorKind.CHANNEL_CLOSED, message)
        except NonFiniteError as err:
            self.error = StageError(ErrorKind.NON_FINITE, str(err))
        except Exception:  # reported to the controller, which decides
            self.error = StageError(ErrorKind.EXCEPTION, traceback.format_exc())
        finally:
            self.done.set()

    def _run(self) -> None:
        """Each step: its micro-batches forward as they arrive, the backward messages the
        method waits for, the end of the step; backward messages that come on their own time
        are handled between steps (and, in lockstep, before the next one)."""
        stage, m = self.stage, self.settings.micro_batches
        for step, micro_batches in self._training_steps():
            for message in micro_batches:
                self._send(message, stage.forward(message.seq, message.activations, message.labels))
            while stage.backward_due():
                self._on_backward(self._recv_target())
            stage.end_step()
            self.step = step + 1
            if self.settings.lockstep and stage.expects_backward:
                self._take_backward(until=(step + 1) * m - 1)
            if stage.is_first:
                self._after_step(step)

    def _training_steps(self) -> Iterator[tuple[int, Iterator[ForwardMessage]]]:
        """(step, its micro-batches as they arrive). Micro-batch j of step s is ``seq``
        s * m + j; stage 0 cuts them from its batch, the others receive them."""
        m = self.settings.micro_batches
        for message in self._train_inputs(between=lambda: self._take_backward(until=None)):
            if self.stage.is_first:
                step = message.seq
                parts = zip(message.activations.chunk(m), message.labels.chunk(m), strict=True)
                yield (
                    step,
                    (
                        ForwardMessage(step * m + j, Kind.TRAIN, x, y)
                        for j, (x, y) in enumerate(parts)
                    ),
                )
            else:
                yield message.seq // m, self._arriving_micro_batches(message, m)

    def _arriving_micro_batches(self, first: ForwardMessage, m: int) -> Iterator[ForwardMessage]:
        """``first`` and the step's other m - 1 micro-batches, each as soon as it arrives."""
        yield first
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
            yield message

    def _train_inputs(self, between: Callable[[], None] = lambda: None) -> Iterator[ForwardMessage]:
        """The TRAIN messages in order, with the STOP, EVAL and CHECKPOINT messages between them
        handled here; ends at STOP or ``stop()``. ``between`` runs before every receive."""
        while not self._stop.is_set():
            between()
            # A look first: with no input ready between steps, the method may work meanwhile
            # (dgl's replay); the receive waits only when it has nothing to do.
            message = self._next_input(timeout=0.0)
            if message is None and not self.stage.idle():
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
            self._finish_probe()
            return True
        if message.kind is Kind.EVAL:
            self._evaluate(message)
        elif message.kind is Kind.PROBE:
            self._probe(message)
        elif message.kind is Kind.CHECKPOINT:
            self._checkpoint(message.seq)
        return False

    # -- pieces ------------------------------------------------------------------------------
    def _send(self, message: ForwardMessage, sends: Sends) -> None:
        """What the method returned for micro-batch ``message``: on, back, or both."""
        if sends.forward is not None:
            self._send_forward(
                ForwardMessage(message.seq, Kind.TRAIN, sends.forward, message.labels)
            )
        if sends.backward is not None and self.backward_out is not None:
            self.backward_out.send(BackwardMessage(message.seq, sends.backward))

    def _on_backward(self, message: BackwardMessage) -> None:
        if message.kind is Kind.PROBE:
            sends = self.stage.probe_backward(message.seq, message.target)
        else:
            self._backward_seq = max(self._backward_seq, message.seq)
            sends = self.stage.backward(message.seq, message.target)
        if sends.backward is not None and self.backward_out is not None:
            self.backward_out.send(BackwardMessage(message.seq, sends.backward, message.kind))

    def _finish_probe(self) -> None:
        """At the end: the exact gradient of a probe still in flight is on its way back
        (the stages after this one handle the probe before the STOP behind it). A full
        backward channel may have dropped it, like any target: the wait is short."""
        deadline = time.monotonic() + self.settings.probe_wait_s
        while self.stage.probe_pending and self.backward_in is not None:
            message = self.backward_in.recv(timeout=POLL_S)
            if message is not None:
                assert isinstance(message, BackwardMessage)
                self._on_backward(message)
            elif self._stop.is_set() or time.monotonic() > deadline:
                return

    def _probe(self, message: ForwardMessage) -> None:
        """A probe batch: on with the graph kept; the exact gradient comes back through
        ``_on_backward`` (from the last stage, at once)."""
        sends = self.stage.probe_forward(message.seq, message.activations, message.labels)
        if sends.forward is not None:
            self._send_forward(
                ForwardMessage(message.seq, Kind.PROBE, sends.forward, message.labels)
            )
        if sends.backward is not None and self.backward_out is not None:
            self.backward_out.send(BackwardMessage(message.seq, sends.backward, Kind.PROBE))

    def _next_input(self, timeout: float = POLL_S) -> ForwardMessage | None:
        """Stage 0 reads the stream; the others wait (at most ``timeout``, to re-check stop)
        for a message."""
        if self.stage.is_first:
            if self.step >= self.settings.schedule.total_steps:
                return ForwardMessage(self.step, Kind.STOP, torch.empty(0), torch.empty(0))
            assert self.stream is not None
            x, y = self.stream.batch(self.step)
            return ForwardMessage(self.step, Kind.TRAIN, x, y)
        assert self.forward_in is not None
        # The depth a message is taken at: a look that finds nothing (a replaying stage looks
        # between its replay updates) is not a sample, or the figure would read low.
        depth = self.forward_in.depth()
        start = time.perf_counter()
        message = self.forward_in.recv(timeout=timeout)
        self.figures.input_wait_s += time.perf_counter() - start
        assert message is None or isinstance(message, ForwardMessage)
        if message is not None:
            self.figures.depth_sum += depth
            self.figures.depth_samples += 1
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
            raise ChannelClosed("stopped while waiting for a backward message")
        finally:
            self.figures.target_wait_s += time.perf_counter() - start

    def _take_backward(self, until: int | None) -> None:
        """Handle every backward message that has arrived; with ``until``, first block until
        the one for micro-batch ``until`` has been handled (lockstep)."""
        if self.backward_in is None or not self.stage.expects_backward:
            return
        while True:
            if until is not None and self._backward_seq < until:
                message: Message | None = self._recv_target()
            else:
                message = self.backward_in.recv(timeout=0)
            if message is None:
                return
            assert isinstance(message, BackwardMessage)
            self._on_backward(message)

    def _after_step(self, step: int) -> None:
        """Stage 0: a checkpoint marker and, at an evaluation point, the test set follow the
        training batch."""
        schedule = self.settings.schedule
        requested = self.stage.agree(self._checkpoint_requested.is_set())
        if requested or schedule.checkpoint_after(step):
            self._checkpoint_requested.clear()
            self._checkpoint(step + 1)
        every = self.settings.probe_every
        if every and (step + 1) % every == 0 and self.stream is not None:
            x, y = self.stream.batch(step)  # the batch just trained on, at its new weights
            self._probe(ForwardMessage(step + 1, Kind.PROBE, x, y))
        if not schedule.evaluate_after(step) or self.test is None:
            return
        for x_b, y_b in self.test():
            self._evaluate(ForwardMessage(step + 1, Kind.EVAL, x_b, y_b))

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
        tally.loss_sum += float(cross_entropy(out, labels, reduction="sum"))
        tally.correct += correct_predictions(out, labels)
        tally.seen += labels.numel()
        tally.samples += labels.shape[0]
        if self.num_test_samples > 0 and tally.samples >= self.num_test_samples:
            self.figures.evals.append(tally.result())
            self._eval = None

    # -- figures -----------------------------------------------------------------------------
    def poll(self) -> StagePoll:
        """Figures since the last poll, and evaluation results finished since then.

        Called from the control thread while the loop runs: it only reads counters and swaps
        lists, so a stale-by-one value is possible and harmless."""
        evals, self.figures.evals = self.figures.evals, []
        saved, self.saved = self.saved, []
        return StagePoll(
            index=self.stage.index,
            step=self.step,
            done=self.done.is_set(),
            error=self.error,
            evals=evals,
            saved=saved,
            figures={
                **self.stage.stats.snapshot(),
                **self._runner_figures(),
                **self._staleness_counts(),
            },
        )

    def _staleness_counts(self) -> dict[str, Any]:
        """The whole run's staleness distribution (a few ints). ``dict()`` copies the Counter in
        one C call under the GIL, so the compute thread cannot change it mid-copy."""
        counts = dict(self.stage.stats.staleness_counts)
        return {"staleness_counts": counts} if counts else {}

    def final_figures(self) -> dict[str, Any]:
        wall = max(time.perf_counter() - self.started_at, 1e-9)
        return stage_summary_figures(self.stage, wall, self._runner_figures())

    def _runner_figures(self) -> dict[str, Any]:
        f = self.figures
        return {
            "rss_mb": resident_mb(),
            "history": self.stage.held(),
            "input_wait_s": f.input_wait_s,
            "target_wait_s": f.target_wait_s,
            "channel_depth": f.depth_sum / f.depth_samples if f.depth_samples else 0.0,
            "targets_dropped": self.dropped_targets(),
            **(gpu_figures(self.stage.device) if self.stage.device.type == "cuda" else {}),
        }


def stage_summary_figures(
    stage: MethodStage, wall_s: float, extra: dict[str, Any]
) -> dict[str, Any]:
    """A stage's figures over the whole run (both trainers' summary.json entries)."""
    stats = stage.stats
    return {
        "index": stage.index,
        "steps": stats.steps,
        "samples_per_s": stats.samples / wall_s if wall_s > 0 else None,
        "busy_fraction": stats.compute_s / wall_s if wall_s > 0 else None,
        **stats.run_figures(),
        **extra,
        "device": str(stage.device),
    }
