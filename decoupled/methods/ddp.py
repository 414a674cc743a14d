"""``ddp``: data-parallel backprop on K replica actors, gradients all-reduced (the baseline a
user with K workers and a model that fits on one would pick).

Every replica holds the whole model and reads the same global batch from the data stream; replica
r trains on its r-th of K equal shards, wrapped in torch's ``DistributedDataParallel`` over the
process group the torch transport opens (gloo on CPU, NCCL between GPUs), so the averaged
gradient, and with it every replica's update, is backprop's on the global batch (batch-norm
aside: each replica normalises its own shard). No message crosses between replicas except the
all-reduce; the last replica also evaluates. It runs on actors only (a process per replica).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from decoupled.methods.base import Method, MethodStage, Sends, StageContext
from decoupled.stage import Stage


class ReplicaStage(MethodStage):
    """One replica: reads data, computes the loss, and is the whole model."""

    def __init__(self, stage: Stage, replicas: int) -> None:
        super().__init__(stage)
        self.replicas = replicas
        # Built at the first step, once the process group exists: DDP's constructor broadcasts
        # replica 0's parameters, a collective every replica must join.
        self._ddp: DistributedDataParallel | None = None

    @property
    def is_first(self) -> bool:
        return True  # every replica reads the data stream

    @property
    def is_last(self) -> bool:
        return True  # ...and computes the loss

    @property
    def expects_backward(self) -> bool:
        return False

    def forward(self, seq: int, x: torch.Tensor, labels: torch.Tensor) -> Sends:
        """x (B, ...), labels (B,): the global batch; this replica trains on its shard."""
        start = time.perf_counter()
        stage = self.stage
        if self._ddp is None:
            if not dist.is_initialized():
                raise RuntimeError("ddp needs the torch process group (runtime.transport=torch)")
            self._ddp = DistributedDataParallel(stage.module)
        shard = x.shape[0] // self.replicas
        rows = slice(stage.index * shard, (stage.index + 1) * shard)
        x, labels = x[rows].to(stage.device, non_blocking=True), labels[rows]
        stage.module.train()
        with stage.autocast():
            logits = self._ddp(x)
        loss, _ = stage.loss(logits.float(), labels, seq)
        stage.backward(loss)  # DDP averages the gradients over the replicas here
        stage.update()
        stage.count(x.shape[0], start)
        return Sends()

    def agree(self, flag: bool) -> bool:
        """Whether any replica raised ``flag`` (a checkpoint request), the same on all."""
        if not dist.is_initialized():
            return flag
        value = torch.tensor([float(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def state_dict(self) -> dict[str, Any]:
        return self.stage.state_dict()  # the plain module's keys, not DDP's "module." ones


class DDP(Method):
    name = "ddp"
    replicas = True

    def build_stage(self, stage: Stage, context: StageContext) -> MethodStage:
        return ReplicaStage(stage, self.num_stages())
