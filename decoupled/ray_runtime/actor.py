"""The stage actor: a thin Ray shell around the core ``Stage`` and ``StageRunner``.

It builds its stage from the config, opens its edges (Ray calls or torch.distributed), runs the
runner on a compute thread of its own, and answers control calls (poll, stop, figures) from
Ray's other threads while it trains. All training logic lives in the core.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import ray
import torch

from decoupled.build import build_stage
from decoupled.channel import Policy, Receiver, Sender
from decoupled.checkpoint import Cut, load_stage, save_stage
from decoupled.config import parse_config
from decoupled.data import eval_source, load_data, train_stream
from decoupled.methods import method_for
from decoupled.ray_runtime.transport_ray import OrderedInbox, RaySender, WireMessage
from decoupled.ray_runtime.transport_torch import (
    TorchReceiver,
    TorchSender,
    close_process_group,
    free_port,
    open_process_group,
)
from decoupled.runner import PROBE_WAIT_S, RunnerSettings, StagePoll, StageRunner
from decoupled.schedule import Schedule


class StageActor:
    """One stage of the network on one worker (wrapped by ``ray.remote`` in the controller)."""

    def __init__(
        self,
        config: dict[str, Any],
        index: int,
        num_stages: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        torch_threads: int,
        checkpoint_dir: str | None = None,
    ) -> None:
        self.cfg = parse_config(config)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.index = index
        self.num_stages = num_stages
        torch.set_num_threads(torch_threads)
        # Ray has set CUDA_VISIBLE_DEVICES to this actor's GPU share by now, so cuda:0 is ours.
        self.device = torch.device("cuda:0" if ray.get_gpu_ids() else "cpu")
        self.stage = build_stage(self.cfg, index, input_shape, num_classes, self.device)
        method = method_for(self.cfg)
        self.micro_batches = method.micro_batches()
        self.replicas = method.replicas
        self.probe_every = method.probe_every()
        # A step that waits for all its micro-batches' gradients must never lose one of them.
        self.back_capacity = max(self.cfg.runtime.channel_capacity, self.micro_batches)
        # The Ray plane's receiving ends (connect_ray); the torch plane has its own.
        self.inbox_forward: OrderedInbox | None = None
        self.inbox_backward: OrderedInbox | None = None
        self.runner: StageRunner | None = None
        self._edges: dict[str, Any] = {}

    # -- set-up --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def free_port(self) -> int:
        return free_port()

    def connect_torch(self, address: str, port: int, backend: str, timeout_s: float) -> None:
        """Join the process group (all stages call this at once) and open the four edges."""
        open_process_group(self.index, self.num_stages, address, port, backend, timeout_s)
        if self.replicas:
            return  # replicas exchange gradients through the group's collectives, no edges
        wire = self.device if backend == "nccl" else torch.device("cpu")
        capacity = self.cfg.runtime.channel_capacity
        i = self.index
        if i > 0:
            self._edges["forward_in"] = TorchReceiver(
                i - 1, "forward", capacity, Policy.BLOCK, wire
            )
            self._edges["backward_out"] = TorchSender(i - 1, "backward", wire)
        if i < self.num_stages - 1:
            self._edges["forward_out"] = TorchSender(i + 1, "forward", wire)
            self._edges["backward_in"] = TorchReceiver(
                i + 1, "backward", self.back_capacity, Policy.DROP_OLDEST, wire
            )

    def connect_ray(self, previous: Any | None, following: Any | None) -> None:
        capacity = self.cfg.runtime.channel_capacity
        if previous is not None:
            self.inbox_forward = OrderedInbox(capacity, Policy.BLOCK)
            self._edges["forward_in"] = self.inbox_forward.channel
            self._edges["backward_out"] = RaySender(previous, "deliver_backward", capacity)
        if following is not None:
            self.inbox_backward = OrderedInbox(self.back_capacity, Policy.DROP_OLDEST)
            self._edges["forward_out"] = RaySender(following, "deliver_forward", capacity)
            self._edges["backward_in"] = self.inbox_backward.channel

    def deliver_forward(self, number: int, message: WireMessage) -> None:
        assert self.inbox_forward is not None, "deliver_forward before connect_ray"
        self.inbox_forward.deliver(number, message, self.cfg.runtime.timeout_s)

    def deliver_backward(self, number: int, message: WireMessage) -> None:
        assert self.inbox_backward is not None, "deliver_backward before connect_ray"
        self.inbox_backward.deliver(number, message, self.cfg.runtime.timeout_s)

    def start(self, steps_per_epoch: int, num_test_samples: int, resume: Cut | None) -> None:
        """Restore from ``resume`` if given, then run the stage loop on its own thread."""
        cfg = self.cfg
        start_step = 0
        if resume is not None:
            self.stage.load_state_dict(load_stage(resume, self.index, self.device))
            start_step = resume.step
        stream = test = None
        if self.stage.is_first:  # stage 0 of a chain; every replica
            dataset = load_data(cfg.data, cfg.model.context, cfg.recurrent.eval_chars)
            stream = train_stream(dataset, cfg.data, cfg.seed)
            # One stage sends the test set through: stage 0 of a chain, the last replica.
            if self.index == (self.num_stages - 1 if self.replicas else 0):
                test = eval_source(dataset, cfg.data, cfg.seed)
        schedule = Schedule.from_config(cfg.train, steps_per_epoch, cfg.checkpoint.every)
        self.stage.stage.optimizer.set_total(schedule.total_steps)
        settings = RunnerSettings(
            schedule=schedule,
            micro_batches=self.micro_batches,
            probe_every=self.probe_every,
            probe_wait_s=min(PROBE_WAIT_S, cfg.runtime.stall_timeout_s / 4),
            lockstep=cfg.runtime.lockstep,
            send_timeout_s=cfg.runtime.timeout_s,
        )
        backward_in: Receiver | None = self._edges.get("backward_in")
        self.runner = StageRunner(
            self.stage,
            settings,
            forward_in=self._edges.get("forward_in"),
            forward_out=self._edges.get("forward_out"),
            backward_in=backward_in,
            backward_out=self._edges.get("backward_out"),
            stream=stream,
            test=test,
            num_test_samples=num_test_samples,
            dropped_targets=lambda: int(getattr(backward_in, "dropped", 0)),
            start_step=start_step,
            save=self._save if self.checkpoint_dir is not None else None,
        )
        self.runner.start()

    def _save(self, step: int) -> None:
        assert self.checkpoint_dir is not None
        save_stage(self.checkpoint_dir, step, self.index, self.stage.state_dict(), self.device)

    # -- control ------------------------------------------------------------------------------
    def request_checkpoint(self) -> None:
        assert self.runner is not None
        self.runner.request_checkpoint()

    def poll(self) -> StagePoll:
        assert self.runner is not None
        return self.runner.poll()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()

    def finish(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the loop to end (bounded), close the edges, return the run's figures."""
        assert self.runner is not None
        self.runner.join(timeout_s)
        for name in ("forward_out", "backward_out"):
            sender: Sender | None = self._edges.get(name)
            close = getattr(sender, "close", None)
            if close is not None:
                close()
        return self.runner.final_figures() | self.describe()

    def shutdown(self) -> None:
        for edge in self._edges.values():
            close = getattr(edge, "close", None)
            if close is not None and not isinstance(edge, RaySender):
                close()
        close_process_group()
