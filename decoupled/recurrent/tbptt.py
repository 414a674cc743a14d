"""Truncated BPTT with synthetic gradients at the segment boundaries.

A sequence is cut into segments of T steps. Segment k starts from the state s_{k-1} that the
previous segment left (cut from its graph) and ends at s_k. Plain tBPTT backpropagates only the
segment's own loss L_k. DNI-aided tBPTT also feeds the synthesizer's estimate of everything that
comes after s_k:

    backward of  L_k + <s_k, δ̂_k>,   δ̂_k = scale · M(s_k) / B   ≈ ∂(L_{k+1} + L_{k+2} + ...)/∂s_k

That same backward yields ∂(L_k + <s_k, δ̂_k>)/∂s_{k-1}: the true gradient through segment k
plus the next boundary's synthetic gradient, which is the bootstrapped target for δ̂_{k-1}
(Jaderberg et al. 2016, section 3.1). M is trained on it right away, by regression.

``scale`` multiplies M's output where it is used, not its target, as in the feed-forward stages:
M's fixed point is then the future gradient discounted by ``scale`` per boundary,
M(s_{k-1}) = ∂L_k/∂s_{k-1} + scale · J_kᵀ M(s_k). With ``scale`` = 1 and no end to the sequence
(character streams) the undiscounted sum of all future gradients can grow without bound, and did:
the synthesizer's loss rose past 1e4 within 1000 segments of the char LM; ``scale`` < 1 keeps it
bounded, like λ in TD(λ).

Losses are the per-step cross-entropy summed over the steps and averaged over the batch B. M
predicts the gradient of one sample's summed loss, hence the factor 1/B, so its targets do not
depend on the batch size. The state is the flat (h, c) of every layer (``flatten_state``).

The auxiliary task (``aux_weight > 0``, the paper's "future synthetic gradient prediction"): a
linear head on the core's output at a segment's first step predicts the synthetic gradient at that
segment's end, T steps ahead; its regression loss trains the core too. It changes the core's
update, never the synthesizer's target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decoupled.recurrent.model import LSTMCore, State, flatten_state
from decoupled.synthesizer import MLPSynthesizer


@dataclass
class SegmentStats:
    """What one segment did. ``loss_sum``: summed cross-entropy (nats) over its counted outputs;
    ``counted``: how many outputs the mask counted; ``sg_*``: the synthesizer's regression on the
    previous boundary's target (None when no target arrived)."""

    loss_sum: float
    counted: int
    sg_loss: float | None = None
    sg_cosine: float | None = None
    aux_loss: float | None = None


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-step cross-entropy (nats), masked, summed over steps and averaged over the batch.

    logits (T, B, C), targets (T, B) int64, mask (T, B) bool."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * mask.flatten().to(ce.dtype)).sum() / logits.shape[1]


class TBPTTLearner:
    """Runs segments of a sequence through ``core``, carrying the state between calls.

    synthesizer: None for plain tBPTT. ``optimizer`` steps the core (and the auxiliary head) after
    each segment when ``segment(update=True)``; ``sg_optimizer`` the synthesizer."""

    def __init__(
        self,
        core: LSTMCore,
        optimizer: torch.optim.Optimizer | None,
        synthesizer: MLPSynthesizer | None = None,
        sg_optimizer: torch.optim.Optimizer | None = None,
        *,
        sg_scale: float = 1.0,
        aux_head: nn.Linear | None = None,
        aux_weight: float = 0.0,
    ) -> None:
        if synthesizer is not None and sg_optimizer is None:
            raise ValueError("a synthesizer needs its optimizer")
        if aux_weight > 0 and (aux_head is None or synthesizer is None):
            raise ValueError("the auxiliary task needs a synthesizer and an auxiliary head")
        self.core, self.optimizer = core, optimizer
        self.synthesizer, self.sg_optimizer = synthesizer, sg_optimizer
        self.sg_scale = sg_scale
        self.aux_head, self.aux_weight = aux_head, aux_weight
        self.state: State | None = None
        # The flat state at the last boundary, kept until the next segment brings its target.
        self._pending: torch.Tensor | None = None
        # The last bootstrapped target (B, state_size), per sample; for inspection and tests.
        self.last_target: torch.Tensor | None = None

    def reset(self, batch: int) -> None:
        """A new sequence: zero state, and no boundary waiting for a target (nothing before the
        first step depends on it)."""
        self.state = self.core.initial_state(batch)
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        """Everything the next segments depend on: the weights, both optimizers, and the state
        carried across the boundary with its pending synthesizer input (text streams run on)."""

        def of(part: nn.Module | torch.optim.Optimizer | None) -> dict[str, Any] | None:
            return part.state_dict() if part is not None else None

        return {
            "core": self.core.state_dict(),
            "optimizer": of(self.optimizer),
            "synthesizer": of(self.synthesizer),
            "sg_optimizer": of(self.sg_optimizer),
            "aux_head": of(self.aux_head),
            "state": self.state,
            "pending": self._pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``, into a learner built from the same configuration."""
        parts: list[tuple[str, nn.Module | torch.optim.Optimizer | None]] = [
            ("core", self.core),
            ("optimizer", self.optimizer),
            ("synthesizer", self.synthesizer),
            ("sg_optimizer", self.sg_optimizer),
            ("aux_head", self.aux_head),
        ]
        for key, part in parts:
            if (part is None) != (state[key] is None):
                raise ValueError(f"the saved learner {'lacks' if part else 'has'} a {key}")
            if part is not None:
                part.load_state_dict(state[key])
        saved = state["state"]
        self.state = None if saved is None else (saved[0], saved[1])
        self._pending = state["pending"]

    def synthetic_gradient(self, flat_state: torch.Tensor) -> torch.Tensor:
        """δ̂ = scale · M(s) / B: the estimated gradient of the batch-mean future loss w.r.t. s."""
        assert self.synthesizer is not None
        with torch.no_grad():
            out: torch.Tensor = self.synthesizer(flat_state)
        return self.sg_scale * out / flat_state.shape[0]

    def segment(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        *,
        last: bool = False,
        update: bool = True,
        future_grad: torch.Tensor | None = None,
    ) -> SegmentStats:
        """Forward and backward of one segment, then (``update``) an optimizer step.

        x (T, B, inputs), targets and mask (T, B). ``last``: the sequence ends here, so no future
        loss depends on the final state and no synthetic gradient is added. ``future_grad``
        (B, state_size), when given, replaces the synthesizer's δ̂ at this segment's end (tests
        feed the exact future gradient through it). Without ``update`` the gradients stay in the
        parameters' ``.grad``, added to what earlier segments left there."""
        if self.state is None:
            self.reset(x.shape[1])
        assert self.state is not None
        want_target = self.synthesizer is not None or future_grad is not None
        h0, c0 = (t.detach().requires_grad_(want_target) for t in self.state)
        logits, outputs, state = self.core(x, (h0, c0))
        loss = sequence_loss(logits, targets, mask)
        total = loss
        flat = flatten_state(state)
        delta: torch.Tensor | None = None
        if future_grad is not None:
            delta = future_grad
        elif self.synthesizer is not None and not last:
            delta = self.synthetic_gradient(flat.detach())
        if delta is not None:
            total = total + (flat * delta.detach()).sum()
        aux = self._aux_loss(outputs[0], delta) if not last else None
        if update and self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(total, retain_graph=aux is not None)
        stats = SegmentStats(float(loss.detach()) * x.shape[1], int(mask.sum()))
        if want_target:
            assert h0.grad is not None and c0.grad is not None
            # Per sample: the gradient of the batch-mean loss times B (see the module docstring).
            self.last_target = flatten_state((h0.grad, c0.grad)) * x.shape[1]
            if self._pending is not None and self.synthesizer is not None:
                stats.sg_loss, stats.sg_cosine = self._train_synthesizer(
                    self._pending, self.last_target
                )
        if aux is not None:
            # After the target was read: the auxiliary loss must not leak into it.
            torch.autograd.backward(self.aux_weight * aux)
            stats.aux_loss = float(aux.detach())
        if update and self.optimizer is not None:
            self.optimizer.step()
        self.state = (state[0].detach(), state[1].detach())
        self._pending = None if last else flat.detach()
        return stats

    def _aux_loss(
        self, first_output: torch.Tensor, delta: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Regression of the head's prediction from the first step's output (B, hidden) onto the
        per-sample synthetic gradient at the segment's end."""
        if self.aux_head is None or self.aux_weight <= 0 or delta is None:
            return None
        target = delta.detach() * first_output.shape[0]
        return F.mse_loss(self.aux_head(first_output), target)

    def _train_synthesizer(
        self, flat_state: torch.Tensor, target: torch.Tensor
    ) -> tuple[float, float]:
        assert self.synthesizer is not None and self.sg_optimizer is not None
        target = target.detach()
        prediction: torch.Tensor = self.synthesizer(flat_state)
        sg_loss = F.mse_loss(prediction, target)
        self.sg_optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(sg_loss)
        self.sg_optimizer.step()
        cosine = float(F.cosine_similarity(prediction.detach().flatten(), target.flatten(), dim=0))
        return float(sg_loss.detach()), cosine
