"""Two cores at two clock rates on two Ray actors (Jaderberg et al. 2016, section 3.2).

Each actor is a thin shell around its core's loop (``recurrent/clock_trainer.py``), run on a
compute thread of its own so that deliveries and polls are answered while it trains. The slow
actor hands o_j to the fast one, and the fast actor g_j back, by calling the other's ``deliver``
(a non-blocking put into a bounded, drop-oldest mailbox); each keeps at most ``IN_FLIGHT`` calls
unanswered, so a stalled peer cannot pile up messages, and only the time spent waiting for that
bound counts as waiting on the peer (submitting a call is the sender's own work). The bound is
wide (a message is B x D floats) so that the peer's Ray threads answering late under load does
not hold the sender back. The driver only starts, polls and stops them, and seals a cut once
both actors have written their part of it (``clock_trainer.py`` says what a cut holds).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
import torch

from decoupled.checkpoint import Cut, commit_cut
from decoupled.config import Config, config_to_dict, parse_config
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.metrics import RunLog
from decoupled.ray_runtime.connect import init_ray
from decoupled.recurrent.clock_trainer import (
    NUM_CORES,
    CoreLoop,
    FastLoop,
    SlowLoop,
    check_clock_cut,
    clock_summary,
    lockstep,
    save_to,
)

IN_FLIGHT = 64  # unanswered deliveries per actor
CALL_TIMEOUT_S = 60.0  # a control call or a delivery that takes longer means the peer is gone
POLL_EVERY_S = 0.5
INTERRUPT_CHECKPOINT_S = 60.0  # how long a signalled run waits for its last cut


class _Outbox:
    """Calls to the peer's ``deliver``, at most ``IN_FLIGHT`` unanswered. ``wait=False`` (the
    unbounded decoupled slow core, whose outputs the fast core may skip anyway): a message that
    finds the bound reached is not sent (counted in ``unsent``) rather than waited for."""

    def __init__(self, peer: Any, wait: bool = True) -> None:
        self.peer, self.wait = peer, wait
        self.pending: list[Any] = []
        self.unsent = 0

    def send(self, tick: int, tensor: torch.Tensor) -> float:
        """Seconds spent waiting for the peer to answer earlier calls."""
        if not self.wait and len(self.pending) >= IN_FLIGHT:
            _, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
            if len(self.pending) >= IN_FLIGHT:
                self.unsent += 1
                return 0.0
        self.pending.append(self.peer.deliver.remote(tick, tensor))
        if len(self.pending) <= IN_FLIGHT:
            return 0.0
        t0 = time.perf_counter()
        self.flush(len(self.pending) - IN_FLIGHT)
        return time.perf_counter() - t0

    def flush(self, count: int | None = None) -> None:
        """Wait until ``count`` (default: all) pending calls are answered."""
        count = len(self.pending) if count is None else count
        ready, self.pending = ray.wait(self.pending, num_returns=count, timeout=CALL_TIMEOUT_S)
        if len(ready) < count:
            raise TimeoutError(f"the peer core did not take a message within {CALL_TIMEOUT_S:g}s")
        ray.get(ready, timeout=CALL_TIMEOUT_S)


class _CoreActor:
    loop: CoreLoop

    def __init__(self, config: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.cfg: Config = parse_config(config)
        self.checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
        torch.set_num_threads(max(1, int(self.cfg.runtime.cpus_per_stage)))
        self.outbox: _Outbox | None = None

    def ready(self) -> bool:
        return True

    def start(self) -> None:
        self.loop.start()

    def poll(self) -> dict[str, Any]:
        return self._report()

    def _report(self) -> dict[str, Any]:
        unsent = self.outbox.unsent if self.outbox is not None else 0
        return {**self.loop.report(), "unsent": unsent}

    def stop(self) -> None:
        self.loop.stop()

    def finish(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the loop to end (stopping it after ``timeout_s``); its final figures."""
        if not self.loop.join(timeout_s):
            self.loop.stop()
            self.loop.join(CALL_TIMEOUT_S)
        return self._report()

    def _send(self, tick: int, tensor: torch.Tensor) -> float:
        assert self.outbox is not None, "connect first"
        return self.outbox.send(tick, tensor)


class SlowActor(_CoreActor):
    def __init__(
        self, config: dict[str, Any], checkpoint_dir: str | None, resume: Cut | None
    ) -> None:
        super().__init__(config, checkpoint_dir)
        save = save_to(self.checkpoints, 0) if self.checkpoints is not None else None
        self.loop = self.slow = SlowLoop(self.cfg, self._send, self._end, save, self._announce)
        if resume is not None:
            self.slow.restore(resume)

    def connect(self, fast: Any) -> None:
        unbounded = not lockstep(self.cfg) and self.cfg.clock.max_ahead == 0
        self.outbox = _Outbox(fast, wait=not unbounded)

    def interrupt(self) -> None:
        self.slow.interrupt()

    def _announce(self, step: int) -> None:
        """Answered before o_step is sent: the fast core cannot have read it yet."""
        assert self.outbox is not None
        ray.get(self.outbox.peer.cut_at.remote(step), timeout=CALL_TIMEOUT_S)

    def deliver(self, tick: int, grad: torch.Tensor) -> None:
        """g_j from the fast core."""
        self.slow.targets.put(tick, grad)

    def _end(self) -> None:
        assert self.outbox is not None
        self.outbox.flush()
        ray.get(self.outbox.peer.end_of_input.remote(), timeout=CALL_TIMEOUT_S)


class FastActor(_CoreActor):
    def __init__(
        self, config: dict[str, Any], checkpoint_dir: str | None, resume: Cut | None
    ) -> None:
        super().__init__(config, checkpoint_dir)
        save = save_to(self.checkpoints, 1) if self.checkpoints is not None else None
        self.loop = self.fast = FastLoop(self.cfg, self._send, save)
        if resume is not None:
            self.fast.restore(resume)

    def cut_at(self, step: int) -> None:
        self.fast.cut_at(step)

    def connect(self, slow: Any) -> None:
        self.outbox = _Outbox(slow)

    def deliver(self, tick: int, output: torch.Tensor) -> None:
        """o_j from the slow core."""
        self.fast.inputs.put(tick, output)

    def end_of_input(self) -> None:
        self.fast.inputs.close()


def train_clock_on_ray(
    cfg: Config,
    out_dir: Path | None,
    resume: Cut | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Run the two cores on two actors as configured; metrics.jsonl and cuts into ``out_dir``,
    continuing from ``resume``; returns the summary. Raises RuntimeError when a core fails or
    stalls, ``Interrupted`` once a cut is written after a ``stop`` request."""
    if resume is not None:
        check_clock_cut(resume, cfg)
    started = init_ray(cfg)
    actors: list[Any] = []
    try:
        config = config_to_dict(cfg)
        checkpoints = out_dir / "checkpoints" if out_dir is not None else None
        where = str(checkpoints) if checkpoints is not None else None
        options = {"num_cpus": cfg.runtime.cpus_per_stage, "num_gpus": 0, "max_concurrency": 8}
        slow: Any = ray.remote(SlowActor).options(**options).remote(config, where, resume)
        fast: Any = ray.remote(FastActor).options(**options).remote(config, where, resume)
        actors = [slow, fast]
        ray.get([a.ready.remote() for a in actors], timeout=cfg.runtime.timeout_s)
        ray.get([slow.connect.remote(fast), fast.connect.remote(slow)], timeout=CALL_TIMEOUT_S)
        driver = _Driver(cfg, slow, fast, checkpoints, resume, stop or StopRequest())
        return driver.run(out_dir)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


class _Driver:
    """Starts the two actors, polls them until both are done, seals the cuts they write."""

    def __init__(
        self,
        cfg: Config,
        slow: Any,
        fast: Any,
        checkpoints: Path | None,
        resume: Cut | None,
        stop: StopRequest,
    ) -> None:
        self.cfg, self.slow, self.fast = cfg, slow, fast
        self.checkpoints, self.stop = checkpoints, stop
        self.first = resume.step if resume is not None else 0
        self.last_cut: Cut | None = resume
        self._saved: dict[int, set[int]] = {}  # step -> cores whose part of that cut is written
        self._interrupted_at: float | None = None

    def run(self, out_dir: Path | None) -> dict[str, Any]:
        cfg, slow, fast = self.cfg, self.slow, self.fast
        steps = cfg.train.steps or 0
        with RunLog(out_dir, steps, cfg.train.progress, cfg) as log:
            log.advance(0, position=self.first)
            ray.get([fast.start.remote(), slow.start.remote()], timeout=CALL_TIMEOUT_S)
            logged, progress_at, last_chunks = (
                self.first // cfg.train.log_every,
                time.monotonic(),
                -1,
            )
            while True:
                time.sleep(POLL_EVERY_S)
                polls = ray.get([slow.poll.remote(), fast.poll.remote()], timeout=CALL_TIMEOUT_S)
                self._seal(polls)
                for role, poll in zip(("slow", "fast"), polls, strict=True):
                    if poll["error"]:
                        raise RuntimeError(f"the {role} core failed: {poll['error']}")
                s, f = polls
                log.advance(0, position=s["chunks"])
                if s["chunks"] // cfg.train.log_every > logged:
                    logged = s["chunks"] // cfg.train.log_every
                    log.write(_record(cfg, s, f))
                if self.stop.requested:
                    self._interrupt(s["chunks"])
                if s["done"] and f["done"]:
                    break
                if s["chunks"] + f["chunks"] != last_chunks:
                    last_chunks, progress_at = s["chunks"] + f["chunks"], time.monotonic()
                elif time.monotonic() - progress_at > cfg.runtime.stall_timeout_s:
                    raise RuntimeError(
                        f"no core made a step for {cfg.runtime.stall_timeout_s:g}s "
                        "(runtime.stall_timeout_s)"
                    )
            finals = ray.get(
                [slow.finish.remote(CALL_TIMEOUT_S), fast.finish.remote(CALL_TIMEOUT_S)],
                timeout=2 * CALL_TIMEOUT_S + 10,
            )
            self._seal(finals)
            if self.stop.requested:  # both ended after the interrupt's cut: report it
                self._interrupt(finals[0]["chunks"], force=True)
            log.write(_record(cfg, *finals))
            wall_s = log.wall_s()
        summary = clock_summary(cfg, finals[0], finals[1], wall_s, resumed_from=self.first)
        log.finish(summary)
        return summary

    def _seal(self, polls: list[dict[str, Any]]) -> None:
        """Commit every cut both cores have written their part of."""
        if self.checkpoints is None:
            return
        for index, poll in enumerate(polls):
            for step in poll["saved"]:
                if self.last_cut is not None and step <= self.last_cut.step:
                    continue
                cores = self._saved.setdefault(step, set())
                cores.add(index)
                if len(cores) == NUM_CORES:
                    config = config_to_dict(self.cfg)
                    self.last_cut = commit_cut(
                        self.checkpoints, step, NUM_CORES, config, self.cfg.checkpoint.keep
                    )
                    del self._saved[step]

    def _interrupt(self, step: int, force: bool = False) -> None:
        """On a signal: the slow core takes a cut at its next tick and ends the run; once both
        parts are sealed (or the wait is over), stop with ``Interrupted``."""
        signum = self.stop.signum
        assert signum is not None
        if self.checkpoints is None:
            raise Interrupted(signum, step, None)
        now = time.monotonic()
        if self._interrupted_at is None:
            ray.get(self.slow.interrupt.remote(), timeout=CALL_TIMEOUT_S)
            self._interrupted_at = now
            return
        if force or now - self._interrupted_at > INTERRUPT_CHECKPOINT_S:
            cut = self.last_cut
            raise Interrupted(signum, cut.step if cut else step, str(cut.path) if cut else None)


def _record(cfg: Config, slow: dict[str, Any], fast: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": "train",
        "step": slow["chunks"],
        "samples": fast["chunks"] * cfg.clock.every * cfg.data.batch_size,  # before a resume too
        "train_loss": fast["error_bits"],
        "accuracy": fast["accuracy"],
        "stage0/sg_loss": slow["sg_loss"],
        "stage0/sg_cosine": slow["sg_cosine"],
        "slow_wait_s": slow["wait_s"],
        "fast_wait_s": fast["wait_s"],
        "fast_chunks": fast["chunks"],
        "skipped_chunks": fast["skipped_chunks"],
    }
