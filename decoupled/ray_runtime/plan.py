"""Pure placement decisions: resources per stage actor and the data plane to use."""

from __future__ import annotations

import math
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

    def bundle(self) -> dict[str, float]:
        """The placement-group bundle of one stage actor (no GPU key on CPU)."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


# Ray accounts fractional resources in units of 1e-4: a share is rounded down to that, so that
# the shares placed on one GPU never add up to more than the GPU.
_GPU_UNIT = 10_000


def gpu_share(num_stages: int, cluster_gpus: float) -> float:
    """The GPU fraction per stage so that ``num_stages`` stages fit on ``cluster_gpus`` GPUs.

    Ray places a fractional request on a single GPU, so a share must divide a GPU: with 2 GPUs
    and 3 stages, 2/3 each leaves the third stage without a GPU that has 2/3 free. Each GPU
    holds ceil(K/G) stages instead, at 1/ceil(K/G) each (0.5 for 3 stages on 2 GPUs).
    """
    whole = math.floor(cluster_gpus + 1e-9)
    if whole < 1:
        # Less than one GPU in the cluster (a fractional logical resource): split what is there.
        return math.floor(cluster_gpus / num_stages * _GPU_UNIT) / _GPU_UNIT
    if whole >= num_stages:
        return 1.0
    return math.floor(_GPU_UNIT / math.ceil(num_stages / whole)) / _GPU_UNIT


def _check_fits(num_stages: int, gpus: float, requested: float | str, cluster_gpus: float) -> None:
    """ConfigError when ``num_stages`` requests of ``gpus`` cannot all be placed."""
    where = f"runtime.gpus_per_stage={requested}"
    if gpus < 0:
        raise ConfigError(f"{where} must not be negative")
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"{where}: Ray gives a stage either a fraction of one GPU or whole GPUs")
    if 0 < gpus < 1:
        # Each GPU holds floor(1/share) stages; the Ray accounting unit absorbs float noise.
        per_gpu = math.floor(1 / gpus + 1e-6)
        slots = per_gpu * math.floor(cluster_gpus + 1e-9)
        if slots < num_stages:
            raise ConfigError(
                f"{where}: each GPU holds {per_gpu} stage(s) at that share, so the cluster's "
                f"{cluster_gpus:g} GPUs hold {slots} of the {num_stages} stages; use "
                f"{gpu_share(num_stages, cluster_gpus):g} or auto"
            )
    elif gpus * num_stages > cluster_gpus + 1e-9:
        raise ConfigError(
            f"{where} needs {gpus * num_stages:g} GPUs for {num_stages} stages; the cluster has "
            f"{cluster_gpus:g}"
        )


def plan_resources(
    num_stages: int, gpus_per_stage: float | str, cpus_per_stage: float, cluster_gpus: float
) -> StageResources:
    """``auto``: a whole GPU per stage when the cluster has one for each, a share that divides a
    GPU when stages must share them (``gpu_share``; no memory isolation between sharers), none
    on CPU. A number asks for exactly that much per stage; ConfigError when K of them cannot be
    placed (a fraction of one GPU each, or whole GPUs)."""
    if gpus_per_stage == "auto":
        gpus = gpu_share(num_stages, cluster_gpus) if cluster_gpus > 0 else 0.0
    else:
        gpus = float(gpus_per_stage)
        _check_fits(num_stages, gpus, gpus_per_stage, cluster_gpus)
    return StageResources(cpus=cpus_per_stage, gpus=gpus)


def choose_transport(requested: str, gpus: float) -> tuple[str, str]:
    """(plane, backend): ("torch", "gloo"|"nccl") or ("ray", "object_store").

    ``auto`` takes torch.distributed, several times faster than actor calls: NCCL when every
    stage owns a whole GPU; gloo otherwise (NCCL cannot run two ranks on one GPU), which moves
    CUDA tensors through host memory."""
    if requested == "ray":
        return "ray", "object_store"
    return "torch", "nccl" if gpus >= 1 else "gloo"
