"""Pure placement decisions: resources per stage actor and the data plane to use."""

from __future__ import annotations

from dataclasses import dataclass

from decoupled.config import ConfigError


@dataclass(frozen=True)
class StageResources:
    cpus: float
    gpus: float

    @property
    def torch_threads(self) -> int:
        """Intra-op threads that match the CPU share, so K stages do not oversubscribe a node."""
        return max(1, int(self.cpus))


def plan_resources(
    num_stages: int, gpus_per_stage: float | str, cpus_per_stage: float, cluster_gpus: float
) -> StageResources:
    """``auto``: a whole GPU per stage when the cluster has one for each, an equal share of the
    GPUs when stages must share them (no memory isolation between sharers), none on CPU."""
    if gpus_per_stage == "auto":
        if cluster_gpus >= num_stages:
            gpus = 1.0
        elif cluster_gpus > 0:
            # Round down to hundredths: Ray's GPU accounting is exact to 1e-4, and the K shares
            # must fit in what is there.
            gpus = int(cluster_gpus / num_stages * 100) / 100
        else:
            gpus = 0.0
    else:
        gpus = float(gpus_per_stage)
        if gpus * num_stages > cluster_gpus + 1e-9:
            raise ConfigError(
                f"runtime.gpus_per_stage={gpus_per_stage} needs {gpus * num_stages:g} GPUs for "
                f"{num_stages} stages; the cluster has {cluster_gpus:g}"
            )
    return StageResources(cpus=cpus_per_stage, gpus=gpus)


def choose_transport(requested: str, gpus: float) -> tuple[str, str]:
    """(plane, backend): ("torch", "gloo"|"nccl") or ("ray", "object_store").

    ``auto`` takes torch.distributed, several times faster than actor calls: NCCL when every
    stage owns a whole GPU; gloo otherwise (NCCL cannot run two ranks on one GPU), which moves
    CUDA tensors through host memory."""
    if requested == "ray":
        return "ray", "object_store"
    return "torch", "nccl" if gpus >= 1 else "gloo"
