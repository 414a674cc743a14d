"""The driver side of a Ray run: place the stage actors, wire them, start them, watch them.

The controller is on the control plane only: actor calls to set up, poll figures, and stop.
Activations and targets go straight from actor to actor.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from decoupled.build import num_stages
from decoupled.config import Config, config_to_dict
from decoupled.data import Dataset, TrainStream
from decoupled.metrics import RunLog, build_summary, stage_record
from decoupled.ray_runtime.actor import StageActor
from decoupled.ray_runtime.plan import StageResources, choose_transport, plan_resources
from decoupled.schedule import Schedule

log = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.5
CONTROL_TIMEOUT_S = 60.0  # for a control call to an actor that is alive and answering


class StageFailed(RuntimeError):
    """A stage actor raised, died, or stopped making progress."""


def init_ray(cfg: Config) -> bool:
    """Join or start Ray as configured; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    if cfg.runtime.address:
        ray.init(address=cfg.runtime.address, logging_level=logging.WARNING)
        return True
    # Logical CPUs: enough for every stage even on a small box (each actor sets its threads).
    cpus = max(os.cpu_count() or 1, math.ceil(num_stages(cfg) * cfg.runtime.cpus_per_stage))
    # address="local": start our own, even where another cluster is registered on this host.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def train_on_ray(cfg: Config, dataset: Dataset, out_dir: Path | None) -> dict[str, Any]:
    started = init_ray(cfg)
    job = RayJob(cfg, dataset)
    try:
        return job.run(out_dir)
    finally:
        job.teardown()
        if started:
            ray.shutdown()


class RayJob:
    def __init__(self, cfg: Config, dataset: Dataset) -> None:
        self.cfg = cfg
        self.k = num_stages(cfg)
        self.steps_per_epoch = TrainStream(
            dataset.train_x, dataset.train_y, cfg.data.batch_size, cfg.seed
        ).steps_per_epoch
        self.num_test = int(dataset.test_y.shape[0])
        self.input_shape = dataset.input_shape
        self.num_classes = dataset.num_classes
        self.schedule = Schedule.from_config(cfg.train, self.steps_per_epoch)
        self.actors: list[Any] = []
        self.pg: Any = None
        self.transport: tuple[str, str] = ("", "")
        self.resources: StageResources | None = None

    # -- set-up --------------------------------------------------------------------------------
    def launch(self) -> list[dict[str, Any]]:
        cfg, k = self.cfg, self.k
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        self.resources = res = plan_resources(
            k, cfg.runtime.gpus_per_stage, cfg.runtime.cpus_per_stage, gpus
        )
        bundle = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
        self.pg = placement_group([bundle] * k, strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=cfg.runtime.timeout_s)
        if not ready:
            raise StageFailed(
                f"the cluster cannot place {k} stages of {bundle} within "
                f"{cfg.runtime.timeout_s:g}s (it has {ray.cluster_resources()})"
            )
        remote = ray.remote(StageActor)
        config = config_to_dict(cfg)
        for i in range(k):
            self.actors.append(
                remote.options(
                    num_cpus=res.cpus,
                    num_gpus=res.gpus,
                    max_concurrency=2 * cfg.runtime.channel_capacity
                    + 2 * cfg.method.micro_batches
                    + 4,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.pg, placement_group_bundle_index=i
                    ),
                    name=None,
                ).remote(config, i, k, self.input_shape, self.num_classes, res.torch_threads)
            )
        described: list[dict[str, Any]] = self._all("describe", timeout=cfg.runtime.timeout_s)
        self._connect(described, res)
        return described

    def _connect(self, described: list[dict[str, Any]], res: StageResources) -> None:
        self.transport = plane, backend = choose_transport(self.cfg.runtime.transport, res.gpus)
        if plane == "ray":
            ray.get(
                [
                    actor.connect_ray.remote(
                        self.actors[i - 1] if i > 0 else None,
                        self.actors[i + 1] if i < self.k - 1 else None,
                    )
                    for i, actor in enumerate(self.actors)
                ],
                timeout=CONTROL_TIMEOUT_S,
            )
            return
        port = ray.get(self.actors[0].free_port.remote(), timeout=CONTROL_TIMEOUT_S)
        address = described[0]["node_ip"]
        # Every rank must join the rendezvous at once: one call each, then wait for all.
        self._all(
            "connect_torch",
            address,
            port,
            backend,
            self.cfg.runtime.timeout_s,
            timeout=self.cfg.runtime.timeout_s,
        )

    def _all(self, method: str, *args: Any, timeout: float = CONTROL_TIMEOUT_S) -> list[Any]:
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        try:
            return list(ray.get(refs, timeout=timeout))
        except ray.exceptions.GetTimeoutError as err:
            raise StageFailed(
                f"stage actors did not answer {method!r} within {timeout:g}s"
            ) from err
        except ray.exceptions.RayActorError as err:
            raise StageFailed(f"a stage actor died during {method!r}: {err}") from err

    # -- the run -------------------------------------------------------------------------------
    def run(self, out_dir: Path | None) -> dict[str, Any]:
        cfg = self.cfg
        described = self.launch()
        batch = cfg.data.batch_size
        test: dict[str, Any] = {}
        train_loss: float | None = None
        with RunLog(out_dir, self.schedule.total_steps, cfg.train.progress) as run_log:
            self._all("start", self.steps_per_epoch, self.num_test)
            last_progress, last_step = time.monotonic(), -1
            while True:
                time.sleep(POLL_INTERVAL_S)
                polls = self._all("poll")
                for poll in polls:
                    if poll["error"]:
                        raise StageFailed(f"stage {poll['index']} failed:\n{poll['error']}")
                last = polls[-1]
                step = last["step"]
                run_log.advance(0, position=step)
                record = self._train_record(polls, run_log.wall_s())
                train_loss = record.get("train_loss", train_loss)
                run_log.write(record)
                for result in last["evals"]:
                    test = result
                    run_log.write(
                        {
                            "event": "eval",
                            "samples": result["step"] * batch,
                            "epoch": result["step"] / self.steps_per_epoch,
                            **result,
                        }
                    )
                if all(p["done"] for p in polls):
                    break
                if step != last_step:
                    last_progress, last_step = time.monotonic(), step
                elif time.monotonic() - last_progress > cfg.runtime.timeout_s:
                    raise StageFailed(f"no progress for {cfg.runtime.timeout_s:g}s at step {step}")
            wall_s = run_log.wall_s()
        finals = self._all("finish", CONTROL_TIMEOUT_S)
        for figures in finals:
            if figures["error"]:
                raise StageFailed(f"stage {figures['index']} failed:\n{figures['error']}")
        plane, backend = self.transport
        return build_summary(
            cfg,
            num_stages=self.k,
            steps=self.schedule.total_steps,
            wall_s=wall_s,
            samples=self.schedule.total_steps * batch,
            train_loss=train_loss,
            test_accuracy=test.get("test_accuracy"),
            stages=[_summary_figures(f) for f in finals],
            extra={
                "test_loss": test.get("test_loss"),
                "transport": plane if plane == "ray" else f"{plane}-{backend}",
                "nodes": sorted({d["node_id"] for d in described}),
            },
        )

    def _train_record(self, polls: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
        last = polls[-1]
        step = last["step"]
        record: dict[str, Any] = {
            "event": "train",
            "step": step,
            "samples": step * self.cfg.data.batch_size,
            "epoch": step / self.steps_per_epoch,
            "samples_per_s": step * self.cfg.data.batch_size / wall_s,
            "train_loss": last["train_loss"],
            "train_accuracy": last["train_accuracy"],
        }
        for poll in polls:
            poll["busy_fraction"] = poll["compute_s"] / wall_s
            record.update(stage_record(poll["index"], poll))
        return {k: v for k, v in record.items() if v is not None}

    def state_dicts(self) -> list[dict[str, Any]]:
        """Every stage's module, synthesizer and optimizer states, in stage order."""
        return self._all("state_dict")

    def teardown(self) -> None:
        """Stop and release everything this job started, bounded in time whatever state it is in."""
        if self.actors:
            stops = [actor.stop.remote() for actor in self.actors]
            ray.wait(stops, num_returns=len(stops), timeout=5)
            shutdowns = [actor.shutdown.remote() for actor in self.actors]
            ray.wait(shutdowns, num_returns=len(shutdowns), timeout=10)
            # A graceful exit first (a kill makes Ray print the actor's SystemExit), then a kill
            # for any actor that is stuck.
            exits = [actor.__ray_terminate__.remote() for actor in self.actors]
            ray.wait(exits, num_returns=len(exits), timeout=5)
            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def _summary_figures(final: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "index",
        "samples_per_s",
        "busy_fraction",
        "input_wait_s",
        "target_wait_s",
        "channel_depth",
        "sg_loss",
        "sg_cosine",
        "sg_updates",
        "sg_compute_s",
        "staleness_mean",
        "staleness_p50",
        "staleness_p90",
        "staleness_max",
        "targets_dropped",
        "targets_expired",
        "steps",
        "device",
        "node_ip",
        "node_id",
        "rss_mb",
    )
    return {key: final.get(key) for key in keep}
