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

The two actors are placed as one placement group of two bundles (packed on one node where one
has room), as the feed-forward stages are; after a failure the nodes found gone are kept out of
the next group (``placement.py``), so a restart never waits on a node that hung.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from decoupled.checkpoint import Cut, commit_cut, latest_cut
from decoupled.config import Config, config_to_dict, parse_config
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.metrics import RunLog
from decoupled.ray_runtime.connect import init_ray
from decoupled.ray_runtime.controller import JobState, StageFailed, after_failure, announce_restart
from decoupled.ray_runtime.placement import (
    bundle_selectors,
    lost_nodes,
    node_table,
    raylet_reachable,
)
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
from decoupled.stage import NonFiniteError

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

    def ready(self) -> str:
        """The ID of the node this actor runs on."""
        return str(ray.get_runtime_context().get_node_id())

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
    continuing from ``resume``; returns the summary. A core that fails, dies or stalls restarts
    both from the last complete cut, up to ``runtime.max_failures`` times, then raises
    ``StageFailed``; ``NonFiniteError`` is not retried; ``Interrupted`` once a cut is written
    after a ``stop`` request."""
    if resume is not None:
        check_clock_cut(resume, cfg)
    started = init_ray(cfg)
    job = _ClockJob(cfg, out_dir, resume, stop or StopRequest())
    try:
        return job.run(out_dir)
    finally:
        job.kill()
        if started:
            ray.shutdown()


class _ClockJob:
    """Starts the two actors, polls them until both are done, seals the cuts they write, and
    after a failure starts both again from the last cut (the feed-forward runtime's policy,
    ``controller.after_failure``)."""

    def __init__(self, cfg: Config, out_dir: Path | None, resume: Cut | None, stop: StopRequest):
        self.cfg, self.stop = cfg, stop
        self.checkpoints = out_dir / "checkpoints" if out_dir is not None else None
        self.first = resume.step if resume is not None else 0  # where this run started
        self.last_cut: Cut | None = resume
        self.restarts = 0
        self.actors: dict[str, Any] = {}  # role -> actor, slow first
        self.nodes: dict[str, str] = {}  # role -> the ID of the node its actor runs on
        self.pg: Any = None
        self._excluded: set[str] = set()  # nodes found gone: no core is placed there again
        self._saved: dict[int, set[int]] = {}  # step -> cores whose part of that cut is written
        self._interrupted_at: float | None = None

    def run(self, out_dir: Path | None) -> dict[str, Any]:
        cfg = self.cfg
        finals: list[dict[str, Any]] = []
        with RunLog(out_dir, cfg.train.steps or 0, cfg.train.progress, cfg) as log:
            log.advance(0, position=self.first)
            state, failure = JobState.STARTING, None
            while state is not JobState.DONE:
                try:
                    if state is JobState.STARTING:
                        self._launch()
                        state = JobState.RUNNING
                    elif state is JobState.RUNNING:
                        self._watch(log)
                        state = JobState.STOPPING
                    elif state is JobState.STOPPING:
                        finals = self._finish()
                        state = JobState.DONE
                    elif state is JobState.RESTARTING:
                        assert failure is not None
                        self._restart(log, failure)
                        state = JobState.STARTING
                except StageFailed as err:
                    next_state = after_failure(self.restarts, cfg.runtime.max_failures)
                    if next_state is None:
                        raise self._given_up(err) from err
                    state, failure = next_state, err
            log.write(_record(cfg, *finals))
            wall_s = log.wall_s()
        summary = clock_summary(cfg, finals[0], finals[1], wall_s, resumed_from=self.first)
        summary["restarts"] = self.restarts
        summary["nodes"] = sorted(set(self.nodes.values()))  # the last launch's, as on stages
        log.finish(summary)
        return summary

    def _launch(self) -> None:
        """Both actors, from the last cut, wired to each other and started."""
        cfg = self.cfg
        config = config_to_dict(cfg)
        where = str(self.checkpoints) if self.checkpoints is not None else None
        cpus = cfg.runtime.cpus_per_stage
        selectors = bundle_selectors(NUM_CORES, self._excluded)
        self.pg = placement_group(
            [{"CPU": cpus}] * NUM_CORES, strategy="PACK", bundle_label_selector=selectors
        )
        ready, _ = ray.wait([self.pg.ready()], timeout=cfg.runtime.timeout_s)
        if not ready:
            raise StageFailed(
                f"the cluster cannot place two cores of {cpus:g} CPUs within "
                f"{cfg.runtime.timeout_s:g}s (it has {ray.cluster_resources()})"
            )
        for i, (role, actor) in enumerate((("slow", SlowActor), ("fast", FastActor))):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
            options = {"num_cpus": cpus, "num_gpus": 0, "max_concurrency": 8}
            self.actors[role] = (
                ray.remote(actor)
                .options(**options, scheduling_strategy=strategy)
                .remote(config, where, self.last_cut)
            )
        slow, fast = self.actors["slow"], self.actors["fast"]
        nodes = self._get(
            {"slow": slow.ready.remote(), "fast": fast.ready.remote()}, cfg.runtime.timeout_s
        )
        self.nodes = dict(zip(("slow", "fast"), nodes, strict=True))
        self._get({"slow": slow.connect.remote(fast), "fast": fast.connect.remote(slow)})
        self._get({"fast": fast.start.remote(), "slow": slow.start.remote()})

    def _watch(self, log: RunLog) -> None:
        """Poll until both cores are done; seal cuts; raise on failure, stall or signal."""
        cfg = self.cfg
        poll_timeout = min(CALL_TIMEOUT_S, cfg.runtime.stall_timeout_s)
        start = self.last_cut.step if self.last_cut is not None else 0  # launched from
        logged, progress_at, last_chunks = start // cfg.train.log_every, time.monotonic(), -1
        while True:
            time.sleep(POLL_EVERY_S)
            polls = self._get(
                {role: actor.poll.remote() for role, actor in self.actors.items()}, poll_timeout
            )
            self._seal(polls)  # what was saved before a failure: the last good cut
            for role, poll in zip(self.actors, polls, strict=True):
                if poll["error"] and poll["error"].startswith(f"{NonFiniteError.__name__}:"):
                    raise NonFiniteError(f"the {role} core: {poll['error']}")
                if poll["error"]:
                    raise StageFailed(f"the {role} core failed: {poll['error']}")
            s, f = polls
            log.advance(0, position=s["chunks"])
            if s["chunks"] // cfg.train.log_every > logged:
                logged = s["chunks"] // cfg.train.log_every
                log.write(_record(cfg, s, f))
            if self.stop.requested:
                self._interrupt(s["chunks"])
            if s["done"] and f["done"]:
                return
            if s["chunks"] + f["chunks"] != last_chunks:
                last_chunks, progress_at = s["chunks"] + f["chunks"], time.monotonic()
            elif time.monotonic() - progress_at > cfg.runtime.stall_timeout_s:
                raise StageFailed(
                    f"no core made a step for {cfg.runtime.stall_timeout_s:g}s "
                    "(runtime.stall_timeout_s)"
                )

    def _finish(self) -> list[dict[str, Any]]:
        """Both cores' final figures, once their loops have ended."""
        finals = self._get(
            {role: actor.finish.remote(CALL_TIMEOUT_S) for role, actor in self.actors.items()},
            2 * CALL_TIMEOUT_S + 10,
        )
        self._seal(finals)
        if self.stop.requested:  # both ended after the interrupt's cut: report it
            self._interrupt(finals[0]["chunks"], force=True)
        return finals

    def _restart(self, log: RunLog, failure: StageFailed) -> None:
        """Report the restart, then kill both actors: the next launch starts from the last cut."""
        self.restarts += 1
        self._saved.clear()
        # Only this driver seals cuts: the last one is known before the teardown.
        if self.checkpoints is not None:
            self.last_cut = latest_cut(self.checkpoints) or self.last_cut
        step = self.last_cut.step if self.last_cut is not None else 0
        samples = step * self.cfg.clock.every * self.cfg.data.batch_size
        announce_restart(log, failure, self.restarts, self.cfg.runtime.max_failures, step, samples)
        self._excluded |= lost_nodes(self.nodes.values(), node_table(ray.nodes()), raylet_reachable)
        self.kill()
        self._interrupted_at = None  # a signal seen before: ask the new slow core for its cut

    def _given_up(self, failure: StageFailed) -> StageFailed:
        """The failure that ends the run, saying where it can go on from."""
        cut = self.last_cut
        where = f"the last cut is {cut.path} (step {cut.step})" if cut else "no cut was written"
        return StageFailed(
            f"{failure}; no restart left (runtime.max_failures={self.cfg.runtime.max_failures}); "
            f"{where}"
        )

    def kill(self) -> None:
        """Release both actors, whatever their state: a dead or hung one answers nothing."""
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors = {}
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def _get(self, calls: dict[str, Any], timeout: float = CALL_TIMEOUT_S) -> list[Any]:
        """The results of one call per core (by role), or ``StageFailed`` naming the core whose
        actor died or did not answer within ``timeout``."""
        refs = list(calls.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        results: dict[str, Any] = {}
        for role, ref in calls.items():  # a death first: it may be why the other hangs
            if ref in ready:
                try:
                    results[role] = ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError as err:
                    raise StageFailed(f"the {role} core's actor died: {err}") from err
        for role in calls:
            if role not in results:
                raise StageFailed(f"the {role} core's actor did not answer within {timeout:g}s")
        return [results[role] for role in calls]

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
            self._get({"slow": self.actors["slow"].interrupt.remote()})
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
