"""Two LSTM cores at two clock rates (Jaderberg et al. 2016, section 3.2); Ray-free.

The input is a stream, cut into chunks of k steps (``clock.every``). The **slow core** ticks once
per chunk: at tick j it reads chunk j's k inputs at once and emits o_j (B, D), its interface.
The **fast core** ticks every step: through chunk j+1 it reads each step's input, the step's
phase in the chunk and o_j. The gradient of the fast core's loss over those k steps with respect
to o_j, g_j (B, D), is what the slow core needs to learn from.

- **lockstep** (``method.name=backprop``): the slow core waits for g_j, backpropagates it
  through tick j and updates, and only then ticks again. True gradients; the cores take turns.
- **decoupled** (``method.name=dni``): the slow core updates at once from
  δ̂_j = scale · M(o_j) / B, a synthesizer at its interface, and ticks on. g_j comes back later
  and trains M on ‖M(o_j) − B·g_j‖² (o_j kept in a bounded, tick-keyed history). M's last layer
  starts at zero, so until targets arrive the fast loss does not move the slow core at all.

The fast core learns by plain truncated BPTT (``model.bptt`` = T steps per segment, segments
never span two chunks, the state runs on across them); it is the same in both modes.

**Task: lag copy** (``data.name=lag_copy``). Every step brings a random symbol of an alphabet of
A (``recurrent.alphabet``); the fast core must output the symbol seen k steps earlier. With
T < k the fast core alone cannot learn this (no gradient reaches k steps back, so it stays at
chance, 1/A); the slow core sees the whole previous chunk in one tick, so its one output can
carry it, but only if it learns from the fast core's gradient. The two timescales are what the
task is made of: the slow core summarises chunks, the fast core reads the summary out step by
step. Chunks are random and fresh, so each chunk's predictions (made before the update on it)
score unseen data.

Losses: cross-entropy summed over a segment's steps and averaged over the batch, as in
``tbptt.py``; g_j is the gradient of that batch-mean loss, M predicts one sample's (hence B).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decoupled.config import Config
from decoupled.history import ActivationHistory
from decoupled.optim import build_optimizer, build_synthesizer_optimizer
from decoupled.recurrent.model import LSTMCore, State
from decoupled.recurrent.tasks import LN2
from decoupled.recurrent.tbptt import sequence_loss
from decoupled.stage import NonFiniteError

# A stand-in for the synthesizer, (tick, o_j) -> the gradient to update the slow core with (B, D):
# tests force the exact true gradient through it.
Oracle = Callable[[int, torch.Tensor], torch.Tensor]


class LagCopy:
    """The lag-copy stream: ``chunk(j)`` is the same (k, B) int64 symbols on every process for a
    given seed, so the two actors read the data themselves and only o_j and g_j travel."""

    def __init__(self, alphabet: int, every: int, seed: int) -> None:
        if alphabet < 2 or every < 1:
            raise ValueError(
                f"lag copy needs alphabet >= 2 and every >= 1, got {alphabet}, {every}"
            )
        self.alphabet, self.every, self.seed = alphabet, every, seed
        self.slow_inputs = every * alphabet
        self.outputs = alphabet

    def fast_inputs(self, interface: int) -> int:
        return self.alphabet + self.every + interface

    def chunk(self, j: int, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + j) % 2**63)
        return torch.randint(0, self.alphabet, (self.every, batch), generator=g)

    def slow_input(self, chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(k, B) symbols -> (1, B, k·A): the whole chunk as one tick's input."""
        one_hot = F.one_hot(chunk.t(), self.alphabet).to(dtype)
        return one_hot.reshape(1, chunk.shape[1], -1)

    def fast_input(self, chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(k, B) symbols -> (k, B, A + k): each step's symbol and its phase in the chunk."""
        k, batch = chunk.shape
        phase = torch.eye(k, dtype=dtype)[:, None, :].expand(k, batch, k)
        return torch.cat([F.one_hot(chunk, self.alphabet).to(dtype), phase], dim=-1)


class InterfaceSynthesizer(nn.Module):
    """M(o, x) ≈ B·∂L/∂o: ``layers`` hidden ReLU layers of ``hidden`` units on o (B, D) and the
    chunk the slow core read, x (B, k·A), then a zero-initialised linear output (B, D) (its bias
    at PyTorch's default when ``zero_start`` is off, ``method.sg.zero_start``).

    It sees x as cDNI sees the label: the true gradient depends on the symbols the fast core
    must write, which are that chunk's, and the slow core has it at hand. A linear M on o alone
    did not learn it (cosine to its targets about 0 after 1500 ticks, the fast core at chance)."""

    def __init__(
        self, interface: int, context: int, layers: int, hidden: int, zero_start: bool = True
    ) -> None:
        super().__init__()
        width, parts = interface + context, list[nn.Module]()
        for _ in range(layers):
            parts += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        out = nn.Linear(width, interface)
        nn.init.zeros_(out.weight)
        if zero_start:
            nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*parts, out)

    def forward(self, o: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(torch.cat([o, context], dim=-1))
        return out


class SlowLearner:
    """The slow core: one tick per chunk, its state running on (truncated at every tick).

    ``tick`` runs the forward pass and keeps its graph; ``update(grad)`` backpropagates a
    gradient w.r.t. the output through it and steps the optimizer; ``learn`` trains the
    synthesizer on a late true gradient."""

    def __init__(
        self,
        core: LSTMCore,
        optimizer: torch.optim.Optimizer,
        synthesizer: InterfaceSynthesizer | None = None,
        sg_optimizer: torch.optim.Optimizer | None = None,
        *,
        sg_scale: float = 1.0,
        history: int = 64,
    ) -> None:
        if synthesizer is not None and sg_optimizer is None:
            raise ValueError("a synthesizer needs its optimizer")
        self.core, self.optimizer = core, optimizer
        self.synthesizer, self.sg_optimizer = synthesizer, sg_optimizer
        self.sg_scale = sg_scale
        self.history = ActivationHistory(history)
        self.state: State | None = None
        self._out: torch.Tensor | None = None  # o_j with its graph, until update
        self._context: torch.Tensor | None = None  # x_j (B, k·A), what M is conditioned on
        self.expired = 0  # targets whose o_j had left the history

    def tick(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Tick j on x (1, B, k·A); returns o_j (B, D), detached."""
        if self.state is None:
            self.state = self.core.initial_state(x.shape[1])
            self.state = (self.state[0].to(x.dtype), self.state[1].to(x.dtype))
        out, _, (h, c) = self.core(x, self.state)
        self.state = (h.detach(), c.detach())
        self._out, self._context = out[0], x[0]
        if self.synthesizer is not None:
            # The history's "labels" slot holds the context: M is conditioned on it.
            self.history.put(j, self._out.detach(), x[0])
        return self._out.detach()

    def synthetic_gradient(self, o: torch.Tensor) -> torch.Tensor:
        """δ̂ = scale · M(o, x) / B (B, D) for the last tick's o and input x: the estimated
        ∂L/∂o of the batch-mean fast loss."""
        assert self.synthesizer is not None and self._context is not None
        with torch.no_grad():
            out: torch.Tensor = self.synthesizer(o, self._context)
        return self.sg_scale * out / o.shape[0]

    def update(self, grad: torch.Tensor) -> None:
        """Backward of <o_j, grad> through the last tick, then an optimizer step."""
        if self._out is None:
            raise RuntimeError("update before tick, or twice for one tick")
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward((self._out * grad.detach()).sum())
        self.optimizer.step()
        self._out = None

    def learn(self, j: int, target: torch.Tensor) -> tuple[float, float] | None:
        """Train M on tick j's true gradient g_j (B, D) of the batch-mean loss; (SG loss,
        cosine to the target), or None when o_j is no longer kept."""
        assert self.synthesizer is not None and self.sg_optimizer is not None
        entry = self.history.pop(j)
        if entry is None:
            self.expired += 1
            return None
        per_sample = target.detach() * target.shape[0]
        prediction: torch.Tensor = self.synthesizer(entry.activations, entry.labels)
        loss = F.mse_loss(prediction, per_sample)
        self.sg_optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        self.sg_optimizer.step()
        cosine = F.cosine_similarity(prediction.detach().flatten(), per_sample.flatten(), dim=0)
        return float(loss.detach()), float(cosine)

    def state_dict(self) -> dict[str, Any]:
        """Everything the slow core carries from one tick to the next, between ticks: weights,
        optimizers, the recurrent state and the outputs still waiting for their target."""
        if self._out is not None:
            raise RuntimeError("a tick without its update cannot be saved")
        sg, sg_opt = self.synthesizer, self.sg_optimizer
        return {
            "core": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "synthesizer": sg.state_dict() if sg is not None else None,
            "sg_optimizer": sg_opt.state_dict() if sg_opt is not None else None,
            "state": self.state,
            "history": self.history.items(),
            "expired": self.expired,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["core"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["synthesizer"] is None) != (self.synthesizer is None):
            raise ValueError("the saved slow core and this one differ in having a synthesizer")
        if self.synthesizer is not None and self.sg_optimizer is not None:
            self.synthesizer.load_state_dict(state["synthesizer"])
            self.sg_optimizer.load_state_dict(state["sg_optimizer"])
        self.state = _state_tuple(state["state"])
        self.history.clear()
        for j, entry in state["history"]:
            self.history.put(j, *entry)
        self.expired = state["expired"]


@dataclass
class ChunkResult:
    """One fast chunk: ``grad`` (B, D) ∂L/∂o_j of the chunk's batch-mean loss; the summed loss
    (nats), correct predictions and predictions counted."""

    grad: torch.Tensor
    loss_nats: float
    correct: int
    counted: int


class FastLearner:
    """The fast core: truncated BPTT over each chunk, reading the slow core's output."""

    def __init__(self, core: LSTMCore, optimizer: torch.optim.Optimizer, bptt: int) -> None:
        self.core, self.optimizer, self.bptt = core, optimizer, bptt
        self.state: State | None = None

    def reset(self) -> None:
        """A gap in the stream: the state starts afresh."""
        self.state = None

    def chunk(self, x: torch.Tensor, o: torch.Tensor, targets: torch.Tensor) -> ChunkResult:
        """x (k, B, A + k) the chunk's inputs, o (B, D) the slow output it reads, targets (k, B)."""
        k, batch = targets.shape
        if self.state is None:
            h, c = self.core.initial_state(batch)
            self.state = (h.to(x.dtype), c.to(x.dtype))
        o_leaf = o.detach().to(x.dtype).requires_grad_()
        loss_nats, correct = 0.0, 0
        mask = torch.ones_like(targets, dtype=torch.bool)
        for start in range(0, k, self.bptt):
            s = slice(start, min(start + self.bptt, k))
            steps = s.stop - s.start
            inputs = torch.cat([x[s], o_leaf.expand(steps, batch, o_leaf.shape[1])], dim=-1)
            logits, _, (h, c) = self.core(inputs, self.state)
            loss = sequence_loss(logits, targets[s], mask[s])
            self.optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)  # o_leaf.grad sums over the chunk's segments
            self.optimizer.step()
            self.state = (h.detach(), c.detach())
            loss_nats += float(loss.detach()) * batch
            correct += int((logits.detach().argmax(-1) == targets[s]).sum())
        if not math.isfinite(loss_nats):
            raise NonFiniteError(f"the fast core's loss is {loss_nats}")
        assert o_leaf.grad is not None
        return ChunkResult(o_leaf.grad, loss_nats, correct, k * batch)

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimizer and the state carried into the next chunk."""
        return {
            "core": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": self.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["core"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.state = _state_tuple(state["state"])


def _state_tuple(state: Any) -> State | None:
    """An LSTM state as saved (a tuple, or a list after a round trip), or None."""
    if state is None:
        return None
    h, c = state
    return (h, c)


@dataclass
class Figures:
    """Running figures of one core. Errors and accuracy over the last ``window`` chunks."""

    window: int
    chunks: int = 0
    samples: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0  # slow: waiting on the fast core (lockstep: for g_j); fast: for o_j
    skipped: int = 0  # fast: chunks whose o_j was superseded before it could read it
    dropped_targets: int = 0  # slow: targets evicted from a full mailbox
    expired_targets: int = 0  # slow: targets whose o_j had left the history
    sg_loss: float | None = None
    sg_cosine: float | None = None
    recent: deque[tuple[float, int, int]] = field(default_factory=deque)

    def add_chunk(self, result: ChunkResult) -> None:
        self.recent.append((result.loss_nats, result.correct, result.counted))
        while len(self.recent) > self.window:
            self.recent.popleft()

    @property
    def error_bits(self) -> float | None:
        counted = sum(r[2] for r in self.recent)
        return sum(r[0] for r in self.recent) / LN2 / counted if counted else None

    @property
    def accuracy(self) -> float | None:
        counted = sum(r[2] for r in self.recent)
        return sum(r[1] for r in self.recent) / counted if counted else None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run continues from: the chunk count, the SG figures and the window
        the accuracy is taken over. Samples and times are this process's own (rates)."""
        return {
            "chunks": self.chunks,
            "sg_loss": self.sg_loss,
            "sg_cosine": self.sg_cosine,
            "recent": list(self.recent),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chunks = state["chunks"]
        self.sg_loss, self.sg_cosine = state["sg_loss"], state["sg_cosine"]
        self.recent = deque(tuple(r) for r in state["recent"])

    def report(self, wall_s: float) -> dict[str, Any]:
        """What a poll or the summary shows (JSON-ready)."""
        return {
            "chunks": self.chunks,
            "samples": self.samples,
            "samples_per_s": self.samples / wall_s if wall_s > 0 else None,
            "busy_fraction": self.busy_s / wall_s if wall_s > 0 else None,
            "wait_s": self.wait_s,
            "wait_fraction": self.wait_s / wall_s if wall_s > 0 else None,
            "skipped_chunks": self.skipped,
            "dropped_targets": self.dropped_targets,
            "expired_targets": self.expired_targets,
            "sg_loss": self.sg_loss,
            "sg_cosine": self.sg_cosine,
            "error_bits": self.error_bits,
            "accuracy": self.accuracy,
        }


def build_clock(
    cfg: Config, dtype: torch.dtype = torch.float32
) -> tuple[LagCopy, SlowLearner, FastLearner]:
    """The task and both learners, seeded by ``cfg.seed`` (the same on every process)."""
    ck = cfg.clock
    task = LagCopy(cfg.recurrent.alphabet, ck.every, cfg.seed)
    torch.manual_seed(cfg.seed)
    slow_core = LSTMCore(task.slow_inputs, ck.interface, ck.slow_hidden, cfg.model.layers)
    fast_core = LSTMCore(
        task.fast_inputs(ck.interface), task.outputs, cfg.model.hidden, cfg.model.layers
    )
    slow_core, fast_core = slow_core.to(dtype), fast_core.to(dtype)
    synthesizer = sg_optimizer = None
    if cfg.method.name == "dni":
        sg = cfg.method.sg
        synthesizer = InterfaceSynthesizer(
            ck.interface, task.slow_inputs, sg.layers, sg.hidden, sg.zero_start
        )
        synthesizer = synthesizer.to(dtype)
        sg_optimizer = build_synthesizer_optimizer(synthesizer.parameters(), sg.lr, cfg.optim)
    slow = SlowLearner(
        slow_core,
        build_optimizer(list(slow_core.parameters()), cfg.optim),
        synthesizer,
        sg_optimizer,
        sg_scale=cfg.method.sg.scale,
        history=cfg.method.sg.history,
    )
    fast = FastLearner(
        fast_core, build_optimizer(list(fast_core.parameters()), cfg.optim), cfg.model.bptt
    )
    return task, slow, fast


class ClockSystem:
    """Both cores in one process, in the order the actors would run them with no waiting.

    ``lockstep``: the slow core updates from the true g_j. Otherwise from its synthesizer (or
    ``oracle``), and g_j trains the synthesizer ``delay`` ticks later."""

    def __init__(
        self,
        task: LagCopy,
        slow: SlowLearner,
        fast: FastLearner,
        batch: int,
        *,
        lockstep: bool,
        delay: int = 0,
        oracle: Oracle | None = None,
        window: int = 10,
    ) -> None:
        if not lockstep and slow.synthesizer is None and oracle is None:
            raise ValueError("the decoupled mode needs a synthesizer (or an oracle)")
        self.task, self.slow, self.fast, self.batch = task, slow, fast, batch
        self.lockstep, self.delay, self.oracle = lockstep, delay, oracle
        self._late: deque[tuple[int, torch.Tensor]] = deque()
        self.slow_figures, self.fast_figures = Figures(window), Figures(window)
        self.dtype = next(slow.core.parameters()).dtype

    def step(self, j: int) -> ChunkResult:
        """Tick j of the slow core, and chunk j+1 of the fast core, which reads o_j."""
        chunk, following = self.task.chunk(j, self.batch), self.task.chunk(j + 1, self.batch)
        o = self.slow.tick(j, self.task.slow_input(chunk, self.dtype))
        if not self.lockstep:
            grad = self.oracle(j, o) if self.oracle else self.slow.synthetic_gradient(o)
            self.slow.update(grad)
        result = self.fast.chunk(self.task.fast_input(following, self.dtype), o, chunk)
        if self.lockstep:
            self.slow.update(result.grad)
        else:
            self._late.append((j, result.grad))
            while len(self._late) > self.delay:
                self._learn(*self._late.popleft())
        samples = self.task.every * self.batch
        for fig in (self.slow_figures, self.fast_figures):
            fig.chunks += 1
            fig.samples += samples
        self.fast_figures.add_chunk(result)
        return result

    def state_dict(self, index: int) -> dict[str, Any]:
        """Core ``index``'s part of a cut between two steps (0: the slow core, with the targets
        still on their way to it; 1: the fast core)."""
        if index == 0:
            late = [(j, g) for j, g in self._late]
            return {
                **self.slow.state_dict(),
                "late": late,
                "figures": self.slow_figures.state_dict(),
            }
        return {**self.fast.state_dict(), "figures": self.fast_figures.state_dict()}

    def load_state_dict(self, index: int, state: dict[str, Any]) -> None:
        if index == 0:
            self.slow.load_state_dict(state)
            self._late = deque((j, g) for j, g in state["late"])
            self.slow_figures.load_state_dict(state["figures"])
        else:
            self.fast.load_state_dict(state)
            self.fast_figures.load_state_dict(state["figures"])

    def _learn(self, j: int, grad: torch.Tensor) -> None:
        if self.slow.synthesizer is None:
            return
        out = self.slow.learn(j, grad)
        if out is not None:
            self.slow_figures.sg_loss, self.slow_figures.sg_cosine = out
        self.slow_figures.expired_targets = self.slow.expired


class TickMailbox:
    """Tick-keyed messages between the two cores' threads: bounded, never blocking the sender.

    A full mailbox drops its oldest message (counted in ``dropped``). The fast core takes the
    newest output (``take_newest``: the older ones it passes over are returned as skipped), or
    every one in order when the slow core is bounded (``take_oldest``); the lockstep slow core
    waits for one tick's gradient (``take``). Thread-safe; Ray-free."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"mailbox capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.dropped = 0
        self._items: dict[int, torch.Tensor] = {}
        self._closed = False
        self._cond = threading.Condition()

    def put(self, tick: int, tensor: torch.Tensor) -> None:
        with self._cond:
            self._items[tick] = tensor
            while len(self._items) > self.capacity:
                del self._items[min(self._items)]
                self.dropped += 1
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No more messages: waiting takers return None once the mailbox is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take_newest(self, timeout: float) -> tuple[int, torch.Tensor, int] | None:
        """(tick, tensor, skipped): the newest message and how many older ones it removed;
        None after ``timeout`` s, or at once when closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if not self._items:
                return None
            tick = max(self._items)
            tensor = self._items.pop(tick)
            skipped = len(self._items)
            self._items.clear()
            return tick, tensor, skipped

    def wait(self, timeout: float) -> bool:
        """True once a message is in (False after ``timeout`` s, or when closed and empty)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._items or self._closed, timeout) and bool(
                self._items
            )

    def take_oldest(self, timeout: float) -> tuple[int, torch.Tensor, int] | None:
        """(tick, tensor, 0): the oldest message; None as ``take_newest``."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if not self._items:
                return None
            tick = min(self._items)
            return tick, self._items.pop(tick), 0

    def take(self, tick: int, timeout: float) -> torch.Tensor | None:
        """The message of ``tick`` (older ones are discarded); None after ``timeout`` s."""
        with self._cond:
            self._cond.wait_for(lambda: tick in self._items or self._closed, timeout)
            for old in [t for t in self._items if t < tick]:
                del self._items[old]
            return self._items.pop(tick, None)

    def drain(self) -> list[tuple[int, torch.Tensor]]:
        """Every message, oldest first, removed."""
        with self._cond:
            items = sorted(self._items.items())
            self._items.clear()
            return items
