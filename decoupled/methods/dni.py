"""``dni`` and ``cdni``: update at once from a synthetic gradient; targets train the synthesizer.

Stage i < K-1 holds the synthesizer M_{i+1} and a bounded history of its outputs:
  forward:  h_i = f_i(x);  δ̂_i = scale · M_{i+1}(h_i [, y]);  θ_i ← opt(θ_i, (∂h_i/∂θ_i)ᵀ δ̂_i),
            and from the same backward pass the target g_{i-1} = (∂h_i/∂x)ᵀ M_{i+1}(h_i [, y])
            for the previous stage (bootstrapped). It is sent *unscaled*: ``scale`` multiplies
            each stage's own update exactly once instead of compounding down the stages.
  backward: g_i came back (possibly late) for step ``seq``: fit M_{i+1}(h_i [, y]) to it, with the
            h_i kept for that step, and record the fit and the target's staleness.
The last stage trains on the true loss (``LossStage``), so g_{K-2} is the true gradient. cDNI
conditions the synthesizers on the one-hot label (Jaderberg et al. 2016, section 3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from decoupled.history import ActivationHistory
from decoupled.methods.backprop import LossStage
from decoupled.methods.base import Method, MethodStage, Sends, StageContext
from decoupled.optim import build_synthesizer_optimizer
from decoupled.stage import NonFiniteError, Stage, check_finite
from decoupled.synthesizer import Synthesizer, build_synthesizer, fit_loss


class SynthesizerStage(MethodStage):
    """A stage that updates from its synthesizer's prediction and trains it on late targets."""

    def __init__(
        self,
        stage: Stage,
        synthesizer: Synthesizer,
        sg_optimizer: torch.optim.Optimizer,
        scale: float = 1.0,
        history: int = 64,
        train_every: int = 1,
    ) -> None:
        super().__init__(stage)
        self.synthesizer = synthesizer.to(stage.device)
        self.sg_optimizer = sg_optimizer
        # The synthesizer's own fp16 loss scaler (a pass-through otherwise).
        self.sg_scaler = stage.precision.scaler()
        self.scale = scale
        self.history = ActivationHistory(history)
        self.train_every = train_every
        self._last_seq = -1

    def forward(self, seq: int, x: torch.Tensor, labels: torch.Tensor) -> Sends:
        start = time.perf_counter()
        stage = self.stage
        self._last_seq = seq
        labels = labels.to(stage.device, non_blocking=True)
        x, h = stage.forward(x)
        check_finite(h.detach(), "activation", stage.index, seq)
        with torch.no_grad(), stage.autocast():
            prediction = self.synthesizer(h.detach(), labels).float()
        check_finite(prediction, "synthetic gradient", stage.index, seq)
        stage.backward(h, self.scale * prediction if self.scale != 1.0 else prediction)
        stage.update()
        if seq % self.train_every == 0:  # only the steps whose target trains M are kept
            self.history.put(seq, h.detach(), labels)
        target = stage.input_gradient(x)
        if target is not None and self.scale != 1.0:
            target = target / self.scale
        stage.count(x.shape[0], start)
        return Sends(forward=h.detach(), backward=target)

    def backward(self, seq: int, grad: torch.Tensor) -> Sends:
        """Fit M_{i+1}(h_i [, y]) to the target g_i (B, ...) that came back for step ``seq``."""
        if seq % self.train_every:
            return Sends()  # not a training step of M (method.sg.train_every)
        entry = self.history.pop(seq)
        stats = self.stage.stats
        if entry is None:
            stats.targets_expired += 1
            return Sends()
        start = time.perf_counter()
        target = grad.to(self.stage.device, non_blocking=True)
        if self.sg_scaler.is_enabled() and not torch.isfinite(target).all():
            # fp16: the next stage's gradient overflowed (its scaler skips that update and
            # lowers its scale); a target that is not a number is dropped, not fitted.
            stats.targets_expired += 1
            return Sends()
        with self.stage.autocast():
            prediction = self.synthesizer(entry.activations, entry.labels).float()
        loss = fit_loss(prediction, target)
        sg_loss = float(loss.detach())
        if not math.isfinite(sg_loss):
            # An inf/NaN target (an overflowed true gradient, say) would poison M in one step.
            raise NonFiniteError(f"stage {self.index}: non-finite SG loss at step {seq}")
        self.sg_optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(self.sg_scaler.scale(loss))
        self.sg_scaler.step(self.sg_optimizer)
        self.sg_scaler.update()
        cosine = float(F.cosine_similarity(prediction.detach().flatten(), target.flatten(), dim=0))
        stats.record_sg_fit(sg_loss, cosine, staleness=self._last_seq - seq)
        elapsed = time.perf_counter() - start
        stats.sg_compute_s += elapsed
        stats.compute_s += elapsed
        return Sends()

    @torch.no_grad()
    def predicted_gradient(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.stage.autocast():
            prediction: torch.Tensor = self.synthesizer(h, labels)
        return self.scale * prediction.float()

    def held(self) -> int:
        return len(self.history)

    def state_dict(self) -> dict[str, Any]:
        state = {
            **self.stage.state_dict(),
            "synthesizer": self.synthesizer.state_dict(),
            "sg_optimizer": self.sg_optimizer.state_dict(),
        }
        if self.sg_scaler.is_enabled():
            state["sg_scaler"] = self.sg_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage.load_state_dict(state)
        self.synthesizer.load_state_dict(state["synthesizer"])
        self.sg_optimizer.load_state_dict(state["sg_optimizer"])
        if self.sg_scaler.is_enabled() and "sg_scaler" in state:
            self.sg_scaler.load_state_dict(state["sg_scaler"])
        self.history.clear()


class DNI(Method):
    name = "dni"
    synthetic_gradients = True
    conditioned = False  # cDNI: the synthesizers also see the one-hot label

    def build_stage(self, stage: Stage, context: StageContext) -> MethodStage:
        if stage.is_last:
            return LossStage(stage)
        sg = self.cfg.method.sg
        synthesizer = self._synthesizer(context.output_shape, context.num_classes, stage.index)
        return SynthesizerStage(
            stage,
            synthesizer,
            build_synthesizer_optimizer(synthesizer.parameters(), sg.lr, self.cfg.optim),
            scale=sg.scale,
            history=sg.history,
            train_every=sg.train_every,
        )

    def _synthesizer(self, shape: tuple[int, ...], num_classes: int, index: int) -> Synthesizer:
        sg = self.cfg.method.sg
        # Seeded apart from the model, so that adding a synthesizer never shifts the model's
        # init, and inside a forked RNG, so that building one leaves the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1000 + index)
            return build_synthesizer(shape, sg, num_classes if self.conditioned else None)

    def boundary_work(
        self, shape: tuple[int, ...], num_classes: int
    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """A prediction and, as every target arrives, one training step of the synthesizer."""
        synthesizer = self._synthesizer(shape, num_classes, 0)
        params = list(synthesizer.parameters())

        def work(h: torch.Tensor, labels: torch.Tensor) -> None:
            with torch.no_grad():
                synthesizer(h, labels)
            loss = fit_loss(synthesizer(h, labels), torch.zeros_like(h))
            grads = torch.autograd.grad(loss, params)
            # A plain step in place of the stage's Adam (a few elementwise passes more): the
            # split is decided where no torch optimizer need be built (the job's driver).
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g, alpha=1e-4)

        return work


class CDNI(DNI):
    name = "cdni"
    conditioned = True
