"""The peer: ``torch.distributed.pipelining`` (GPipe, 1F1B) on the project's workers and model.

K stages run in K Ray actors (1 CPU each, one torch thread, placed like the project's stage
actors), joined by the project's own gloo process group (``open_process_group``). Each actor
builds its slice of the model with ``build_stage_modules`` from the same config and seed as the
project's ``pipeline`` run, reads the same batches from its own ``TrainStream`` (a pure function
of seed and step, so stage 0's inputs and the last stage's labels match without shipping them),
and steps the optimizer ``build_optimizer`` makes for it after every schedule step. The loss is
the mean cross-entropy of each micro-batch at the last stage, and the schedules' ``scale_grads``
divides the accumulated gradient by the micro-batch count: the batch mean, as the project does.

Every stage reads ``time.perf_counter`` at each step boundary; the last stage's clock gives the
steady-state rate through the same ``common.steady_rate`` that reads the project's
``metrics.jsonl`` (from the first step at 20% of the run to the last step before the end).

    .venv/bin/python bench/peer_pipelining.py                        # K=2, GPipe and 1F1B
    .venv/bin/python bench/peer_pipelining.py --stages 2 4 --steps 300
    .venv/bin/python bench/peer_pipelining.py --check                # one step vs the project

``--check`` runs one GPipe step of the peer and one step of the project's in-process trainer from
the same seed and batch, and compares every parameter after it: against ``pipeline`` with the same
micro-batches (equal up to float rounding: batch-norm sees the same micro-batches) and against
``backprop`` with one micro-batch (the whole batch in one piece, so equal up to rounding too).
On torch 2.13, CPU, K=2 and 3, both came out identical to the last bit, under Adam and SGD.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from typing import Any, Final

import ray
import torch
from common import add_model_args, steady_rate
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from decoupled.balance import balanced
from decoupled.config import Config, config_to_dict, parse_config
from decoupled.data import Dataset, TrainStream, load_dataset
from decoupled.local import LocalTrainer
from decoupled.models import build_stage_modules
from decoupled.optim import build_optimizer
from decoupled.ray_runtime.transport_torch import (
    close_process_group,
    free_port,
    open_process_group,
)
from decoupled.stage import cross_entropy

SCHEDULES: Final = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
CONTROL_TIMEOUT_S: Final = 60.0  # set-up and teardown calls; a healthy actor answers in seconds


class TimedStage(PipelineStage):
    """A ``PipelineStage`` that adds up the time spent in its own forward and backward chunks,
    so the peer reports per-stage compute (the rest of a step is communication and bubbles)."""

    compute_s: float = 0.0

    def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().forward_one_chunk(*args, **kwargs)
        finally:
            self.compute_s += time.perf_counter() - start

    def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            self.compute_s += time.perf_counter() - start


class PeerStageActor:
    """Stage ``index`` of K under ``torch.distributed.pipelining`` (wrapped by ``ray.remote``)."""

    def __init__(self, config: dict[str, Any], index: int, dataset: Dataset) -> None:
        torch.set_num_threads(1)  # like the project's actors with 1 CPU each
        self.cfg = parse_config(config)
        self.index = index
        self.num_stages = self.cfg.stages
        self.dataset = dataset
        modules = build_stage_modules(
            self.cfg.model, self.num_stages, dataset.input_shape, dataset.num_classes, self.cfg.seed
        )
        self.module = modules[index]
        self.optimizer = build_optimizer(self.module.parameters(), self.cfg.optim)

    def node_ip(self) -> str:
        return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]

    def free_port(self) -> int:
        return free_port()

    def connect(self, address: str, port: int, timeout_s: float) -> None:
        # The project's group: the pipelining stage talks on the default group it opens; the
        # two per-direction data groups it also makes stay idle here.
        open_process_group(self.index, self.num_stages, address, port, "gloo", timeout_s)

    def train(self, schedule: str, steps: int) -> dict[str, Any]:
        """``steps`` schedule steps, each followed by an optimizer step; clocks and losses."""
        cfg, k = self.cfg, self.num_stages
        stage = TimedStage(self.module, self.index, k, torch.device("cpu"))
        runner = SCHEDULES[schedule](
            stage,
            n_microbatches=cfg.method.micro_batches,
            loss_fn=cross_entropy,  # the project's: (B, C) or (B, T, V) logits
        )
        stream = TrainStream(
            self.dataset.train_x, self.dataset.train_y, cfg.data.batch_size, cfg.seed
        )
        self.module.train()
        step_end_s: list[float] = []
        losses: list[float] = []
        optimizer_s = 0.0
        started = time.perf_counter()
        for step in range(steps):
            x, y = stream.batch(step)
            self.optimizer.zero_grad(set_to_none=True)
            if self.index == 0:
                runner.step(x)
            elif self.index == k - 1:
                micro_losses: list[torch.Tensor] = []
                # Outputs are not kept, as our pipeline keeps none; the losses still come back.
                runner.step(target=y, losses=micro_losses, return_outputs=False)
                losses.append(float(torch.stack(micro_losses).detach().mean()))
            else:
                runner.step()
            update = time.perf_counter()
            self.optimizer.step()
            optimizer_s += time.perf_counter() - update
            step_end_s.append(time.perf_counter())
        return {
            "index": self.index,
            "started_s": started,
            "step_end_s": step_end_s,
            "losses": losses,
            "compute_s": stage.compute_s + optimizer_s,
        }

    def parameters(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.module.named_parameters()}

    def close(self) -> None:
        close_process_group()


def run_peer(
    cfg: Config, schedule: str, dataset: Dataset, steps: int, timeout_s: float = 600.0
) -> dict[str, Any]:
    """Train ``steps`` steps of ``cfg`` (a ``pipeline`` config) under ``schedule`` on Ray.

    Needs a running Ray with ``cfg.stages`` free CPUs. Returns each stage's ``train`` result in
    ``stages``, every stage's parameters after the run in ``parameters``, and in ``train_s`` the
    seconds from this call until every stage finished its last step (actor start-up included).
    """
    called = time.perf_counter()
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    k = cfg.stages
    pg = placement_group([{"CPU": 1}] * k, strategy="PACK")
    actors: list[Any] = []
    try:
        ready, _ = ray.wait([pg.ready()], timeout=CONTROL_TIMEOUT_S)
        if not ready:
            raise TimeoutError(f"Ray could not place {k} one-CPU stages: too few free CPUs")
        # The actors' workers cannot import this script's folder (bench/ is not a package):
        # ship the module's code with the actor class instead of a reference to it.
        if __name__ != "__main__":
            ray.cloudpickle.register_pickle_by_value(  # type: ignore[no-untyped-call]
                sys.modules[__name__]
            )
        remote = ray.remote(PeerStageActor)
        data = ray.put(dataset)
        # The split is decided here, once, as the project's driver does (model.boundaries=auto).
        config = config_to_dict(balanced(cfg, dataset.input_shape, dataset.num_classes)[0])
        for i in range(k):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
            actors.append(
                remote.options(num_cpus=1, scheduling_strategy=strategy).remote(config, i, data)
            )
        address = ray.get(actors[0].node_ip.remote(), timeout=CONTROL_TIMEOUT_S)
        port = ray.get(actors[0].free_port.remote(), timeout=CONTROL_TIMEOUT_S)
        # Every rank must join the rendezvous at once: one call each, then wait for all.
        ray.get(
            [a.connect.remote(address, port, CONTROL_TIMEOUT_S) for a in actors],
            timeout=CONTROL_TIMEOUT_S,
        )
        results = ray.get([a.train.remote(schedule, steps) for a in actors], timeout=timeout_s)
        train_s = time.perf_counter() - called
        parameters = ray.get([a.parameters.remote() for a in actors], timeout=CONTROL_TIMEOUT_S)
        ray.get([a.close.remote() for a in actors], timeout=CONTROL_TIMEOUT_S)
        return {"stages": results, "parameters": parameters, "train_s": train_s}
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(pg)


def train_records(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The last stage's clock as ``metrics.jsonl``-like train records, one per step, for the
    steady-state window ``common.steady_rate`` reads from the project's runs (whose records
    come once per poll or per ``train.log_every`` steps: the peer's window is the finer one)."""
    last = result["stages"][-1]
    return [
        {"event": "train", "step": step, "wall_s": t - last["started_s"]}
        for step, t in enumerate(last["step_end_s"], start=1)
    ]


def stage_figures(result: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    """Per-stage figures in the shape of ``throughput.py``'s rows; what the peer cannot tell
    apart (SG time: none; input wait: hidden inside the schedule's receives) is left None."""
    rows = []
    for s in result["stages"]:
        steps = len(s["step_end_s"])
        loop_s = s["step_end_s"][-1] - s["started_s"]
        rows.append(
            {
                "index": s["index"],
                "samples_per_s": steps * batch / loop_s,
                "busy_fraction": s["compute_s"] / loop_s,
                "compute_ms_per_step": 1e3 * s["compute_s"] / steps,
                "sg_ms_per_step": None,
                "input_wait_fraction": None,
            }
        )
    return rows


def check_one_step(cfg: Config, dataset: Dataset) -> list[dict[str, Any]]:
    """One peer GPipe step against one step of the project's in-process trainer, every
    parameter compared: ``pipeline`` with the same micro-batches, and ``backprop`` with one
    micro-batch on the peer's side (batch-norm then sees the whole batch on both). Under
    ``cfg.optim`` and under plain SGD: Adam's first step is lr·sign(g) whatever the gradient's
    scale, so only SGD shows a wrongly scaled gradient. Needs a running Ray."""
    initial = [
        p.detach().clone()
        for module in build_stage_modules(
            cfg.model, 1, dataset.input_shape, dataset.num_classes, cfg.seed
        )
        for p in module.parameters()
    ]
    rows = []
    for optim in dict.fromkeys((cfg.optim.name, "sgd")):
        for method, micro in (("pipeline", cfg.method.micro_batches), ("backprop", 1)):
            overrides = [f"optim.name={optim}", f"method.micro_batches={micro}"]
            peer_cfg = parse_config(config_to_dict(cfg), [*overrides, "method.name=pipeline"])
            peer = run_peer(peer_cfg, "gpipe", dataset, steps=1)["parameters"]
            ours_cfg = parse_config(config_to_dict(cfg), [*overrides, f"method.name={method}"])
            trainer = LocalTrainer(ours_cfg, dataset)
            trainer.step(0, *trainer.stream.batch(0))
            # backprop keeps the whole model in one module: compare parameters in model order.
            peer_flat = [p for stage in peer for p in stage.values()]
            ours_flat = [p.detach() for s in trainer.stages for p in s.module.parameters()]
            pairs = list(zip(peer_flat, ours_flat, strict=True))
            rows.append(
                {
                    "optim": optim,
                    "ours": method,
                    "micro_batches": micro,
                    "max_abs_difference": max(float((a - b).abs().max()) for a, b in pairs),
                    "max_abs_update": max(
                        float((b - i).abs().max()) for b, i in zip(ours_flat, initial, strict=True)
                    ),
                }
            )
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--check", action="store_true", help="compare one step with the project's")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    k_max = max(args.stages)
    ray.init(
        address="local",
        num_cpus=k_max,
        num_gpus=0,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        for k in args.stages:
            cfg = parse_config(
                {},
                [
                    "method.name=pipeline",
                    f"stages={k}",
                    "data.name=digits",
                    f"data.batch_size={args.batch}",
                    "model.name=fcn",
                    f"model.layers={args.layers}",
                    f"model.hidden={args.hidden}",
                    f"method.micro_batches={args.micro_batches}",
                ],
                source="bench",
            )
            dataset = load_dataset(cfg.data)
            if args.check:
                for row in check_one_step(cfg, dataset):
                    print(
                        f"K={k} {row['optim']}: peer GPipe x{row['micro_batches']} vs our "
                        f"{row['ours']}: max |difference| {row['max_abs_difference']:.3g} "
                        f"(one step moved weights by up to {row['max_abs_update']:.3g})",
                        flush=True,
                    )
                continue
            for schedule in SCHEDULES:
                result = run_peer(cfg, schedule, dataset, args.steps)
                records = train_records(result)
                rate = steady_rate(records, args.steps, args.batch)
                losses = result["stages"][-1]["losses"]
                print(
                    f"{schedule} K={k}: {rate:.0f} samples/s steady; train loss "
                    f"{statistics.mean(losses[:5]):.3f} (first 5 steps) -> "
                    f"{statistics.mean(losses[-5:]):.3f} (last 5)",
                    flush=True,
                )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
