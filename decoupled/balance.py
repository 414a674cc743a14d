"""``model.boundaries=auto``: split the blocks into stages by their measured cost.

Like torchgpipe's balance-by-time: every block's forward and backward is timed on a batch of the
configured size (on a copy of the model, so batch-norm statistics and the weights are untouched),
the method's own work at a stage boundary (a synthesizer's prediction and training, an auxiliary
head) is timed on the activation that crosses it, and the split that minimises the slowest
stage wins. Splits within ``TOLERANCE`` of that optimum are equally good, and the one nearest
to an even split by block count is taken, so that identical blocks split evenly however noisy
the clock.

The split is decided once, by whoever sets the run up (the in-process trainer, the Ray driver),
and travels to the stages as explicit boundaries; a resumed run keeps its checkpoint's split.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from decoupled.checkpoint import CheckpointError, Cut
from decoupled.config import Config
from decoupled.methods import method_for
from decoupled.models import build_blocks, even_boundaries, example_input
from decoupled.transformer import embeds_tokens

TOLERANCE = 0.05  # splits whose slowest stage is within 5% of the best count as ties
REPEATS = 3  # timed runs per block; the fastest counts (the least disturbed by other work)


@dataclass(frozen=True)
class Balance:
    """The chosen split: stage k starts at block ``boundaries[k - 1]``."""

    boundaries: list[int]
    stage_costs_ms: list[float] | None  # measured, per stage; None when nothing was measured
    how: str  # "auto" (measured), "even" or "given"


def _timed(work: Callable[[], None]) -> float:
    work()  # warm-up: allocator, kernel choice
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def block_costs(
    blocks: Sequence[nn.Module], input_shape: tuple[int, ...], batch: int
) -> tuple[list[float], list[torch.Tensor]]:
    """Seconds of forward + backward of each block on a batch, and each block's output (the
    input of the next), on copies of the blocks."""
    costs, outputs = [], []
    x = example_input(blocks[0], input_shape, batch, random=True)
    for index, block in enumerate(copy.deepcopy(list(blocks))):
        block.train()
        inp = x.detach().requires_grad_(index > 0)

        def work(block: nn.Module = block, inp: torch.Tensor = inp) -> None:
            out = block(inp)
            torch.autograd.backward(out, torch.ones_like(out))

        costs.append(_timed(work))
        with torch.no_grad():
            x = block(x)
        outputs.append(x)
    return costs, outputs


def partition(
    costs: Sequence[float], overheads: Sequence[float], stages: int, tolerance: float = TOLERANCE
) -> list[int]:
    """Boundaries splitting blocks with ``costs`` into ``stages`` contiguous stages so that the
    slowest stage is as fast as possible; ``overheads[b]`` is added to a stage that ends with
    block b and is not the last (its boundary work). Among splits within ``tolerance`` of the
    best, the one closest to an even split by block count."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} blocks into {stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(start: int, end: int) -> float:  # blocks [start, end)
        extra = overheads[end - 1] if end < n else 0.0
        return prefix[end] - prefix[start] + extra

    def best_split(cap: float | None) -> tuple[float, list[int]] | None:
        """Minimal slowest stage (cap None), or minimal distance from the even split among the
        splits whose every stage costs at most ``cap``."""
        even = even_boundaries(n, stages)
        inf = float("inf")
        # score[s][j]: best score placing blocks [0, j) into s stages; prev for the path.
        score = [[inf] * (n + 1) for _ in range(stages + 1)]
        prev = [[-1] * (n + 1) for _ in range(stages + 1)]
        score[0][0] = 0.0
        for s in range(1, stages + 1):
            for j in range(s, n - (stages - s) + 1):
                for i in range(s - 1, j):
                    if score[s - 1][i] == inf:
                        continue
                    c = cost(i, j)
                    if cap is None:
                        value = max(score[s - 1][i], c)
                    elif c > cap:
                        continue
                    else:
                        value = score[s - 1][i] + (abs(j - even[s - 1]) if s < stages else 0)
                    if value < score[s][j]:
                        score[s][j], prev[s][j] = value, i
        if score[stages][n] == inf:
            return None
        bounds, j = [], n
        for s in range(stages, 1, -1):
            j = prev[s][j]
            bounds.append(j)
        return score[stages][n], bounds[::-1]

    optimum = best_split(None)
    assert optimum is not None
    chosen = best_split(optimum[0] * (1 + tolerance))
    assert chosen is not None  # the optimum itself is within the cap
    return chosen[1]


def resolve_boundaries(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> Balance:
    """The split ``cfg`` asks for: measured for "auto", even for "even" or [], else as given."""
    method = method_for(cfg)
    k = method.num_stages()
    bounds = cfg.model.boundaries
    blocks = build_blocks(cfg.model, input_shape, num_classes, cfg.seed)
    if isinstance(bounds, list) and bounds:
        return Balance(list(bounds), None, "given")
    if k == 1 or method.replicas:
        return Balance([], None, "whole")  # nothing to split: every worker holds all blocks
    if bounds != "auto":
        return Balance(even_boundaries(len(blocks), k), None, "even")
    batch = cfg.data.batch_size
    costs, outputs = block_costs(blocks, input_shape, batch)
    # Token windows in: a label per token (the next one), else one per sample.
    per_token = embeds_tokens(blocks[0]) is not None
    labels = torch.randint(0, num_classes, (batch, *input_shape) if per_token else (batch,))
    overheads = []
    for out in outputs:
        work = method.boundary_work(tuple(out.shape[1:]), num_classes)
        overheads.append(0.0 if work is None else _timed(functools.partial(work, out, labels)))
    chosen = partition(costs, overheads, k)
    edges = [0, *chosen, len(blocks)]
    stage_ms = [
        1e3 * (sum(costs[a:b]) + (overheads[b - 1] if b < len(blocks) else 0.0))
        for a, b in itertools.pairwise(edges)
    ]
    return Balance(chosen, stage_ms, "auto")


def balanced(
    cfg: Config, input_shape: tuple[int, ...], num_classes: int, resume: Cut | None = None
) -> tuple[Config, Balance]:
    """``cfg`` with the split decided (a resumed "auto" run keeps its checkpoint's), and how.

    A resumed run that asks for another split ("even", or a list) than its checkpoint's is
    refused: its stage files hold other blocks."""
    if resume is None:
        balance = resolve_boundaries(cfg, input_shape, num_classes)
        return with_boundaries(cfg, balance.boundaries), balance
    kept = list(resume.config["model"]["boundaries"])
    if cfg.model.boundaries == "auto":
        return with_boundaries(cfg, kept), Balance(kept, None, "resumed")
    balance = resolve_boundaries(cfg, input_shape, num_classes)  # "even" or given: no timing
    if balance.boundaries != kept:
        raise CheckpointError(
            f"{resume.path} does not fit this configuration:\n  model.boundaries: checkpoint "
            f"has {kept}, this run {balance.boundaries} ({cfg.model.boundaries!r})"
        )
    return with_boundaries(cfg, balance.boundaries), balance


def summary_figures(balance: Balance) -> dict[str, Any]:
    """summary.json's record of the split."""
    return {
        "boundaries": balance.boundaries,
        "balance": balance.how,
        "stage_costs_ms": balance.stage_costs_ms,
    }


def with_boundaries(cfg: Config, boundaries: list[int]) -> Config:
    """``cfg`` with explicit boundaries (what the stages are built from)."""
    model = dataclasses.replace(cfg.model, boundaries=list(boundaries))
    return dataclasses.replace(cfg, model=model)
