"""The driver side of a Ray run: place the stage actors, wire them, start them, watch them.

The controller is on the control plane only: actor calls to set up, poll figures, seal
checkpoints and stop. Activations and targets go straight from actor to actor.

Failures: a stage actor that dies (its process or node lost), stops answering polls, or lets the
run stall for ``runtime.stall_timeout_s`` fails the attempt; the controller then tears every
stage down and starts them all again from the last complete checkpoint, up to
``runtime.max_failures`` times. A non-finite loss, activation or synthetic gradient is not
retried: the same data would give the same NaN.
"""

from __future__ import annotations

import enum
import logging
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from decoupled.balance import balanced, summary_figures
from decoupled.build import num_stages
from decoupled.checkpoint import Cut, commit_cut, latest_cut
from decoupled.config import Config, ConfigError, config_to_dict
from decoupled.data import Dataset, DatasetInfo, describe
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.methods import method_for
from decoupled.metrics import (
    RunLog,
    build_summary,
    stage_record,
    steady_samples_per_s,
    summary_stage_figures,
)
from decoupled.models import activation_shapes, build_stage_modules
from decoupled.ray_runtime.actor import StageActor
from decoupled.ray_runtime.connect import init_ray
from decoupled.ray_runtime.placement import (
    bundle_selectors,
    lost_nodes,
    node_table,
    raylet_reachable,
)
from decoupled.ray_runtime.plan import StageResources, choose_transport, plan_resources
from decoupled.runner import ErrorKind, StagePoll
from decoupled.schedule import Schedule
from decoupled.stage import NonFiniteError

log = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.5
CONTROL_TIMEOUT_S = 60.0  # for a control call to an actor that is alive and answering
INTERRUPT_CHECKPOINT_S = 60.0  # how long a signalled run waits for its last cut


class StageFailed(RuntimeError):
    """A stage actor raised, died, or stopped making progress: worth a restart."""


class JobState(enum.Enum):
    """Where a job's run loop is (Ray Train v2's controller keeps the same kind of state)."""

    STARTING = "starting"  # placing the actors, wiring them, restoring the last cut
    RUNNING = "running"  # polling until every stage is done
    RESTARTING = "restarting"  # a failure: tear down, then start again from the last cut
    STOPPING = "stopping"  # every stage done: collect the final figures
    DONE = "done"


def after_failure(restarts: int, max_failures: int) -> JobState | None:
    """The state after a failure, or None when the job must give up."""
    return JobState.RESTARTING if restarts < max_failures else None


def announce_restart(
    run_log: RunLog,
    failure: Exception,
    restarts: int,
    max_failures: int,
    step: int,
    samples: int,
) -> None:
    """Say on stderr and in metrics.jsonl ("restart" record) that restart ``restarts`` goes on
    from the cut at ``step`` (0: the start); the two-core runtime reports its restarts so too."""
    # The first line says which stage; the last, for a traceback, what went wrong.
    lines = str(failure).strip().splitlines()
    reason = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    print(
        f"decoupled: {reason}; restart {restarts}/{max_failures} from step {step}",
        file=sys.stderr,
    )
    run_log.write(
        {
            "event": "restart",
            "restarts": restarts,
            "step": step,
            "samples": samples,
            "reason": reason,
        }
    )


def train_on_ray(
    cfg: Config,
    dataset: Dataset | DatasetInfo,
    out_dir: Path | None,
    resume: Cut | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    started = init_ray(cfg)
    job = RayJob(cfg, dataset, out_dir, resume=resume, stop=stop)
    try:
        return job.run(out_dir)
    finally:
        job.teardown()
        if started:
            ray.shutdown()


class RayJob:
    def __init__(
        self,
        cfg: Config,
        dataset: Dataset | DatasetInfo,
        out_dir: Path | None = None,
        resume: Cut | None = None,
        stop: StopRequest | None = None,
    ) -> None:
        # The driver needs the data's shape and size only: stage 0 reads the samples.
        info = dataset if isinstance(dataset, DatasetInfo) else describe(dataset)
        self.cfg, self.balance = balanced(cfg, info.input_shape, info.num_classes, resume=resume)
        cfg = self.cfg
        self.k = num_stages(cfg)
        if not 1 <= cfg.data.batch_size <= info.train_size:
            raise ConfigError(
                f"data.batch_size: must be at most the train set's {info.train_size} samples, "
                f"got {cfg.data.batch_size}"
            )
        self.steps_per_epoch = info.train_size // cfg.data.batch_size
        self.num_test = info.test_size
        self.input_shape = info.input_shape
        self.num_classes = info.num_classes
        self.schedule = Schedule.from_config(cfg.train, self.steps_per_epoch, cfg.checkpoint.every)
        self.checkpoints = out_dir / "checkpoints" if out_dir is not None else None
        self.resume = resume
        self.first_step = resume.step if resume is not None else 0
        self.stop = stop or StopRequest()
        self.restarts = 0
        self.actors: list[Any] = []
        self.described: list[dict[str, Any]] = []
        self.pg: Any = None
        self._excluded: set[str] = set()  # nodes found gone: no stage is placed there again
        # Indices of actors known dead or not answering: teardown only kills them. A call to an
        # actor whose node is gone fails only after Ray has waited for news of its death, and a
        # hung one answers nothing; each graceful step would wait out its timeout for them.
        self._lost: set[int] = set()
        self.transport: tuple[str, str] = ("", "")
        self.resources: StageResources | None = None
        self._saved: dict[int, set[int]] = {}  # step -> stages whose part of that cut is written
        self._last_cut: Cut | None = resume
        self._wanted_cut = 0  # on a signal: the step the last cut must reach
        self._test: dict[str, Any] = {}
        self._train_loss: float | None = None
        # A dry run of one batch through all stages, here, before any actor is placed: a stage
        # that cannot take its predecessor's output is reported naming both (ConfigError).
        activation_shapes(
            build_stage_modules(cfg.model, self.k, self.input_shape, self.num_classes, cfg.seed),
            self.input_shape,
        )

    # -- set-up --------------------------------------------------------------------------------
    def launch(self) -> None:
        cfg, k = self.cfg, self.k
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        self.resources = res = plan_resources(
            k, cfg.runtime.gpus_per_stage, cfg.runtime.cpus_per_stage, gpus
        )
        if cfg.train.precision == "fp16" and res.gpus == 0:
            raise ConfigError(
                "train.precision: fp16 needs a CUDA device for its loss scaling, and the stages "
                f"get none here (the cluster has {gpus:g} GPUs): use bf16 or fp32"
            )
        bundle = res.bundle()
        selectors = bundle_selectors(k, self._excluded)
        self.pg = placement_group([bundle] * k, strategy="PACK", bundle_label_selector=selectors)
        ready, _ = ray.wait([self.pg.ready()], timeout=cfg.runtime.timeout_s)
        if not ready:
            raise StageFailed(
                f"the cluster cannot place {k} stages of {bundle} within "
                f"{cfg.runtime.timeout_s:g}s (it has {ray.cluster_resources()})"
            )
        remote = ray.remote(StageActor)
        config = config_to_dict(cfg)
        checkpoint_dir = str(self.checkpoints) if self.checkpoints is not None else None
        concurrency = 2 * cfg.runtime.channel_capacity + 2 * cfg.method.micro_batches + 4
        for i in range(k):
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
            self.actors.append(
                remote.options(
                    num_cpus=res.cpus,
                    num_gpus=res.gpus,
                    max_concurrency=concurrency,
                    scheduling_strategy=strategy,
                ).remote(
                    config,
                    i,
                    k,
                    self.input_shape,
                    self.num_classes,
                    res.torch_threads,
                    checkpoint_dir,
                )
            )
        self.described = self._all("describe", timeout=cfg.runtime.timeout_s)
        self._connect(res)

    def _connect(self, res: StageResources) -> None:
        requested = self.cfg.runtime.transport
        if method_for(self.cfg).replicas:
            requested = "torch"  # replicas all-reduce over the process group
        self.transport = plane, backend = choose_transport(requested, res.gpus)
        if plane == "ray":
            for i, actor in enumerate(self.actors):
                previous = self.actors[i - 1] if i > 0 else None
                following = self.actors[i + 1] if i < self.k - 1 else None
                ray.get(actor.connect_ray.remote(previous, following), timeout=CONTROL_TIMEOUT_S)
            return
        port = ray.get(self.actors[0].free_port.remote(), timeout=CONTROL_TIMEOUT_S)
        address = self.described[0]["node_ip"]
        # Every rank must join the rendezvous at once: one call each, then wait for all.
        timeout = self.cfg.runtime.timeout_s
        self._all("connect_torch", address, port, backend, timeout, timeout=timeout)

    def _all(self, method: str, *args: Any, timeout: float = CONTROL_TIMEOUT_S) -> list[Any]:
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        try:
            return list(ray.get(refs, timeout=timeout))
        except ray.exceptions.GetTimeoutError as err:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            self._lost.update(i for i, ref in enumerate(refs) if ref not in ready)
            raise StageFailed(
                f"stage actors did not answer {method!r} within {timeout:g}s"
            ) from err
        except ray.exceptions.RayActorError as err:
            self._lost.update(_dead(refs))
            raise StageFailed(f"a stage actor died during {method!r}: {err}") from err

    # -- the run -------------------------------------------------------------------------------
    def run(self, out_dir: Path | None) -> dict[str, Any]:
        cfg = self.cfg
        finals: list[dict[str, Any]] = []
        with RunLog(out_dir, self.schedule.total_steps, cfg.train.progress, cfg) as run_log:
            state, failure = JobState.STARTING, None
            while state is not JobState.DONE:
                try:
                    if state is JobState.STARTING:
                        self.launch()
                        self._all("start", self.steps_per_epoch, self.num_test, self._last_cut)
                        state = JobState.RUNNING
                    elif state is JobState.RUNNING:
                        self._watch(run_log)
                        state = JobState.STOPPING
                    elif state is JobState.STOPPING:
                        finals = self._all("finish", CONTROL_TIMEOUT_S)
                        state = JobState.DONE
                    elif state is JobState.RESTARTING:
                        assert failure is not None
                        self._restart(run_log, failure)
                        state = JobState.STARTING
                except StageFailed as err:
                    next_state = after_failure(self.restarts, cfg.runtime.max_failures)
                    if next_state is None:
                        raise
                    state, failure = next_state, err
            wall_s = run_log.wall_s()
            progress = run_log.progress
        plane, backend = self.transport
        stages = [summary_stage_figures(f | {"restarts": self.restarts}) for f in finals]
        summary = build_summary(
            cfg,
            num_stages=self.k,
            steps=self.schedule.total_steps,
            wall_s=wall_s,
            samples=(self.schedule.total_steps - self.first_step) * cfg.data.batch_size,
            train_loss=self._train_loss,
            test_accuracy=self._test.get("test_accuracy"),
            stages=stages,
            steady_samples_per_s=steady_samples_per_s(
                progress, self.first_step, self.schedule.total_steps, cfg.data.batch_size
            ),
            extra={
                "test_loss": self._test.get("test_loss"),
                "transport": plane if plane == "ray" else f"{plane}-{backend}",
                "nodes": sorted({d["node_id"] for d in self.described}),
                "restarts": self.restarts,
                "resumed_from": self.first_step or None,
                **summary_figures(self.balance),
            },
        )
        run_log.finish(summary)
        return summary

    def _restart(self, run_log: RunLog, failure: StageFailed) -> None:
        self.restarts += 1
        # Only this controller seals cuts, so the cut to restart from is known before the
        # teardown: the restart is reported when the failure is noticed.
        self._saved.clear()
        if self.checkpoints is not None:
            self._last_cut = latest_cut(self.checkpoints) or self._last_cut
        step = self._last_cut.step if self._last_cut is not None else 0
        announce_restart(
            run_log,
            failure,
            self.restarts,
            self.cfg.runtime.max_failures,
            step,
            samples=step * self.cfg.data.batch_size,
        )
        stage_nodes = [d["node_id"] for d in self.described]
        self._excluded |= lost_nodes(stage_nodes, node_table(ray.nodes()), raylet_reachable)
        self.teardown(graceful=False)

    def _watch(self, run_log: RunLog) -> None:
        """Poll until every stage is done; seal cuts; raise on failure, stall or signal."""
        cfg, batch = self.cfg, self.cfg.data.batch_size
        poll_timeout = min(CONTROL_TIMEOUT_S, cfg.runtime.stall_timeout_s)
        last_progress, last_step = time.monotonic(), -1
        interrupted_at: float | None = None
        while True:
            time.sleep(POLL_INTERVAL_S)
            polls: list[StagePoll] = sorted(
                self._all("poll", timeout=poll_timeout), key=lambda p: p.index
            )
            for poll in polls:  # seal what was saved before a failure: the last good cut
                self._record_saved(poll)
            for poll in polls:
                if poll.error is None:
                    continue
                if poll.error.kind is ErrorKind.NON_FINITE:
                    raise NonFiniteError(poll.error.message)
                raise StageFailed(f"stage {poll.index} failed:\n{poll.error.message}")
            last = polls[self.k - 1]
            step = last.step
            run_log.advance(0, position=step)
            record = self._train_record(polls, run_log.wall_s())
            self._train_loss = record.get("train_loss", self._train_loss)
            run_log.write(record)
            for result in last.evals:
                self._test = {"test_loss": result.test_loss, "test_accuracy": result.test_accuracy}
                run_log.write(
                    {
                        # When the last stage finished it, not when this poll brought it.
                        "wall_s": round(run_log.since_start(result.at), 4),
                        "event": "eval",
                        "step": result.step,
                        "samples": result.step * batch,
                        "epoch": result.step / self.steps_per_epoch,
                        **self._test,
                    }
                )
            if self.stop.requested:
                interrupted_at = self._interrupt(interrupted_at, polls[0].step)
            if all(p.done for p in polls):
                return
            if step != last_step:
                last_progress, last_step = time.monotonic(), step
            elif time.monotonic() - last_progress > cfg.runtime.stall_timeout_s:
                raise StageFailed(
                    f"no progress for {cfg.runtime.stall_timeout_s:g}s at step {step}"
                )

    def _record_saved(self, poll: StagePoll) -> None:
        for step in poll.saved:
            stages = self._saved.setdefault(step, set())
            stages.add(poll.index)
            if len(stages) == self.k and self.checkpoints is not None:
                self._last_cut = commit_cut(
                    self.checkpoints,
                    step,
                    self.k,
                    config_to_dict(self.cfg),
                    self.cfg.checkpoint.keep,
                )
                del self._saved[step]

    def _interrupt(self, since: float | None, step: int) -> float:
        """On a signal: ask stage 0 for a cut after its current step; once it is sealed (or the
        wait is over), stop with Interrupted."""
        assert self.stop.signum is not None
        now = time.monotonic()
        if since is None:
            if self.checkpoints is None:
                raise Interrupted(self.stop.signum, step, None)
            # Stage 0 of a chain starts the cut; replicas agree on its step among themselves.
            self._all("request_checkpoint")
            self._wanted_cut = step
            return now
        cut = self._last_cut
        if cut is not None and cut.step >= self._wanted_cut:
            raise Interrupted(self.stop.signum, cut.step, str(cut.path))
        if now - since > INTERRUPT_CHECKPOINT_S:
            raise Interrupted(self.stop.signum, step, str(cut.path) if cut else None)
        return since

    def _train_record(self, polls: list[StagePoll], wall_s: float) -> dict[str, Any]:
        last = polls[self.k - 1]
        step = last.step
        record: dict[str, Any] = {
            "event": "train",
            "step": step,
            "samples": step * self.cfg.data.batch_size,
            "epoch": step / self.steps_per_epoch,
            "samples_per_s": (step - self.first_step) * self.cfg.data.batch_size / wall_s,
            "train_loss": last.figures.get("train_loss"),
            "train_accuracy": last.figures.get("train_accuracy"),
        }
        for poll in polls:
            figures = poll.figures | {
                "busy_fraction": poll.figures["compute_s"] / wall_s,
                "restarts": self.restarts,
            }
            record.update(stage_record(poll.index, figures))
        return {k: v for k, v in record.items() if v is not None}

    def teardown(self, graceful: bool = True) -> None:
        """Stop and release everything this job started, bounded in time whatever its state.
        ``graceful=False`` (after a failure) only kills: the actors' edges may be stuck on a
        peer that is gone or hung, and closing them would wait out the timeouts below."""
        if self.actors:
            # Short waits: a hung actor answers none of these, and a restart waits on them.
            alive = [a for i, a in enumerate(self.actors) if i not in self._lost]
            if alive and graceful:
                stops = [actor.stop.remote() for actor in alive]
                ray.wait(stops, num_returns=len(stops), timeout=2)
                shutdowns = [actor.shutdown.remote() for actor in alive]
                ray.wait(shutdowns, num_returns=len(shutdowns), timeout=5)
                # A graceful exit first (a kill makes Ray print the actor's SystemExit), then a
                # kill for any actor that is stuck.
                exits = [actor.__ray_terminate__.remote() for actor in alive]
                ray.wait(exits, num_returns=len(exits), timeout=3)
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            self._lost.clear()
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def _dead(refs: list[Any]) -> set[int]:
    """Indices of the calls that have already failed because their actor died or cannot be
    reached (its node lost)."""
    dead = set()
    for i, ref in enumerate(refs):
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            continue
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError:
            dead.add(i)
        except Exception:  # the stage's own error: its actor is alive
            pass
    return dead
