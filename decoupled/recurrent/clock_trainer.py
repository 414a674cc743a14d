"""Running the two cores of ``clock.py``: the loop each core's actor runs on its compute thread
(``SlowLoop``, ``FastLoop``; Ray-free, the actors in ``ray_runtime/clock.py`` only wire their
``send`` callables to each other), the in-process run (``runtime.backend=local``), and the
summary both write.

summary.json adds to the feed-forward fields: ``mode`` (lockstep or decoupled), ``accuracy`` and
``error_bits`` of the fast core's predictions over its last ``recurrent.window`` chunks (each on
fresh data, predicted before the update on it), each core's ``samples_per_s`` (stream steps times
the batch, per second of its own loop), ``slow_wait_s`` / ``slow_wait_fraction`` (how long the
slow core was blocked on the fast one: in lockstep waiting for g_j, in both modes handing o_j
over), ``fast_wait_s`` (the fast core waiting for o_j), ``skipped_chunks`` (chunks the fast core
passed over because a newer o_j had come), ``unsent_outputs`` (Ray: o_j the unbounded slow
actor did not send because the fast actor had not answered its earlier deliveries).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from decoupled.config import Config
from decoupled.metrics import RunLog, build_summary, summary_stage_figures
from decoupled.recurrent.clock import ClockSystem, Figures, TickMailbox, build_clock

# A core's hand-over to the other actor: (tick, tensor) -> the seconds it was held back waiting
# for the other (a bound on unanswered messages); submitting is the sender's own work.
Send = Callable[[int, torch.Tensor], float]
POLL_S = 0.25  # how often a waiting loop looks at its stop flag


def lockstep(cfg: Config) -> bool:
    """backprop: true gradients, the slow core waits for them; dni: synthetic gradients."""
    return cfg.method.name == "backprop"


class CoreLoop:
    """A core's compute thread: ``start``, ``stop``, ``join``; an exception ends it and is kept
    in ``error`` for the driver's poll."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.figures = Figures(cfg.recurrent.window)
        self.error: str | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._t0 = 0.0
        self._t1: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def wall_s(self) -> float:
        end = self._t1 if self._t1 is not None else time.perf_counter()
        return end - self._t0

    def report(self) -> dict[str, Any]:
        return {
            **self.figures.report(self.wall_s),
            "wall_s": self.wall_s,
            "done": self.done.is_set(),
            "error": self.error,
        }

    def _main(self) -> None:
        try:
            self.run()
        except Exception as err:  # reported to the driver, which raises it
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self._t1 = time.perf_counter()
            self.done.set()

    def run(self) -> None:
        raise NotImplementedError


class SlowLoop(CoreLoop):
    """Ticks ``train.steps`` times; sends each o_j; updates from the synthesizer at once
    (decoupled) or from g_j once it has come (lockstep); trains the synthesizer on the g_j that
    arrived meanwhile. ``targets`` is where the fast core's g_j land."""

    def __init__(self, cfg: Config, send: Send, end: Callable[[], None]) -> None:
        super().__init__(cfg)
        self.task, self.slow, _ = build_clock(cfg)
        self.targets = TickMailbox(cfg.runtime.channel_capacity)
        self.newest = -1  # the latest tick whose true gradient has come
        self._send, self._end = send, end

    def run(self) -> None:
        cfg, fig = self.cfg, self.figures
        batch, timeout = cfg.data.batch_size, cfg.runtime.stall_timeout_s
        for j in range(cfg.train.steps or 0):
            if self._stop.is_set():
                break
            waited = self._hold_back(j, timeout) if not lockstep(cfg) else 0.0
            t0 = time.perf_counter()
            x = self.task.slow_input(self.task.chunk(j, batch), torch.float32)
            o = self.slow.tick(j, x)
            if not lockstep(cfg):
                self.slow.update(self.slow.synthetic_gradient(o))
            time.sleep(cfg.clock.slow_delay_s)
            waited += self._send(j, o)
            t1 = time.perf_counter()
            if lockstep(cfg):
                grad = self._wait_for(j, timeout)
                t3 = time.perf_counter()
                waited += t3 - t1
                self.slow.update(grad)
            else:
                t3 = t1
                self._learn(self.targets.drain())
            t4 = time.perf_counter()
            fig.busy_s += (t4 - t0) - waited
            fig.wait_s += waited
            fig.chunks += 1
            fig.samples += self.task.every * batch
            fig.dropped_targets, fig.expired_targets = self.targets.dropped, self.slow.expired
        self._end()

    def _learn(self, arrived: list[tuple[int, torch.Tensor]]) -> None:
        for tick, target in arrived:
            self.newest = max(self.newest, tick)
            out = self.slow.learn(tick, target)
            if out is not None:
                self.figures.sg_loss, self.figures.sg_cosine = out

    def _hold_back(self, tick: int, timeout: float) -> float:
        """With ``clock.max_ahead``: wait until at most that many ticks before ``tick`` lack
        their gradient, learning from those that come; the seconds waited."""
        ahead = self.cfg.clock.max_ahead
        if not ahead or tick - 1 - self.newest <= ahead:
            return 0.0
        t0 = time.perf_counter()
        while tick - 1 - self.newest > ahead:
            if self._stop.is_set() or time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"no gradient from the fast core within {timeout:g}s")
            if self.targets.wait(POLL_S):
                self._learn(self.targets.drain())
        return time.perf_counter() - t0

    def _wait_for(self, tick: int, timeout: float) -> torch.Tensor:
        deadline = time.perf_counter() + timeout
        while not self._stop.is_set() and time.perf_counter() < deadline:
            grad = self.targets.take(tick, POLL_S)
            if grad is not None:
                return grad
        raise TimeoutError(f"no gradient for tick {tick} from the fast core within {timeout:g}s")


class FastLoop(CoreLoop):
    """Takes the newest o_j (an unbounded decoupled slow core: the fast core reads its latest
    output and skips the chunks it passed over, starting a fresh state after a gap) or the next
    one in order (lockstep, or ``clock.max_ahead`` > 0, which bound the slow core), runs chunk
    j+1 on it and sends g_j back, until the slow core has ended and every o_j is taken.
    ``inputs`` is where the slow core's o_j land."""

    def __init__(self, cfg: Config, send: Send) -> None:
        super().__init__(cfg)
        self.task, _, self.fast = build_clock(cfg)
        bounded = lockstep(cfg) or cfg.clock.max_ahead > 0
        # A bounded slow core has at most max_ahead + 2 outputs untaken: none is ever dropped.
        self.inputs = TickMailbox(max(cfg.runtime.channel_capacity, cfg.clock.max_ahead + 2))
        self._take = self.inputs.take_oldest if bounded else self.inputs.take_newest
        self._send = send

    def run(self) -> None:
        cfg, fig = self.cfg, self.figures
        batch, last = cfg.data.batch_size, -1
        while not self._stop.is_set():
            w0 = time.perf_counter()
            taken = self._take(POLL_S)
            t0 = time.perf_counter()
            fig.wait_s += t0 - w0
            if taken is None:
                if self.inputs.closed:
                    break
                continue
            j, o, _ = taken
            if j <= last:
                continue  # came after a newer one (threaded actors may run calls out of order)
            if j > last + 1:
                fig.skipped += j - last - 1
                self.fast.reset()  # a gap in the stream
            chunk, following = self.task.chunk(j, batch), self.task.chunk(j + 1, batch)
            result = self.fast.chunk(self.task.fast_input(following, torch.float32), o, chunk)
            time.sleep(cfg.clock.fast_delay_s)
            fig.busy_s += time.perf_counter() - t0
            fig.chunks += 1
            fig.samples += self.task.every * batch
            fig.add_chunk(result)
            last = j
            fig.wait_s += self._send(j, result.grad)


def run_on_threads(cfg: Config, timeout_s: float = 600.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both loops on threads of this process, wired mailbox to mailbox as the actors are (the
    two cores then share this process's interpreter lock); their final reports."""

    def to_slow(tick: int, grad: torch.Tensor) -> float:
        slow.targets.put(tick, grad)
        return 0.0

    def to_fast(tick: int, output: torch.Tensor) -> float:
        fast.inputs.put(tick, output)
        return 0.0

    fast = FastLoop(cfg, to_slow)
    slow = SlowLoop(cfg, to_fast, fast.inputs.close)
    fast.start()
    slow.start()
    for loop in (slow, fast):
        if not loop.join(timeout_s):
            slow.stop()
            fast.stop()
            raise TimeoutError(f"the two cores did not finish within {timeout_s:g}s")
    return slow.report(), fast.report()


def clock_summary(
    cfg: Config, slow: dict[str, Any], fast: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """summary.json of a two-core run from each core's final ``report``."""
    stages = []
    for index, (role, fig) in enumerate((("slow", slow), ("fast", fast))):
        stage = summary_stage_figures(
            {
                "index": index,
                "steps": fig["chunks"],
                "samples_per_s": fig["samples_per_s"],
                "busy_fraction": fig["busy_fraction"],
                "input_wait_s": fig["wait_s"] if role == "fast" else None,
                "target_wait_s": fig["wait_s"] if role == "slow" else None,
                "sg_loss": fig["sg_loss"],
                "sg_cosine": fig["sg_cosine"],
            }
        )
        stages.append({**stage, "role": role, **{k: v for k, v in fig.items() if k != "done"}})
    batch = cfg.data.batch_size
    return build_summary(
        cfg,
        num_stages=2,
        steps=slow["chunks"],
        wall_s=wall_s,
        samples=fast["samples"],
        train_loss=fast["error_bits"],
        test_accuracy=None,
        stages=stages,
        extra={
            "mode": "lockstep" if lockstep(cfg) else "decoupled",
            "clock_every": cfg.clock.every,
            "bptt": cfg.model.bptt,
            "batch_size": batch,
            "accuracy": fast["accuracy"],
            "error_bits": fast["error_bits"],
            "slow_samples_per_s": slow["samples_per_s"],
            "fast_samples_per_s": fast["samples_per_s"],
            "slow_wait_s": slow["wait_s"],
            "slow_wait_fraction": slow["wait_fraction"],
            "fast_wait_s": fast["wait_s"],
            "skipped_chunks": fast["skipped_chunks"],
            # Outputs the slow actor did not send: its bound on unanswered calls was reached.
            "unsent_outputs": slow.get("unsent", 0),
            "slow_chunks": slow["chunks"],
            "fast_chunks": fast["chunks"],
        },
    )


def run_clock_local(cfg: Config, out_dir: Path | None) -> dict[str, Any]:
    """Both cores in this process, one after the other (``ClockSystem``): targets come
    ``method.delay`` ticks late, and neither core ever waits."""
    torch.set_num_threads(max(1, int(cfg.runtime.cpus_per_stage)))
    task, slow, fast = build_clock(cfg)
    system = ClockSystem(
        task,
        slow,
        fast,
        cfg.data.batch_size,
        lockstep=lockstep(cfg),
        delay=cfg.method.delay,
        window=cfg.recurrent.window,
    )
    steps = cfg.train.steps or 0
    with RunLog(out_dir, steps, cfg.train.progress, cfg) as log:
        for j in range(steps):
            system.step(j)
            time.sleep(cfg.clock.slow_delay_s + cfg.clock.fast_delay_s)
            log.advance(1)
            if (j + 1) % cfg.train.log_every == 0 or j + 1 == steps:
                log.write(_record(j + 1, system.fast_figures, system.slow_figures, cfg))
        wall_s = log.wall_s()
    for fig in (system.slow_figures, system.fast_figures):
        fig.busy_s = wall_s
    summary = clock_summary(
        cfg, system.slow_figures.report(wall_s), system.fast_figures.report(wall_s), wall_s
    )
    log.finish(summary)
    return summary


def _record(step: int, fast: Figures, slow: Figures, cfg: Config) -> dict[str, Any]:
    return {
        "event": "train",
        "step": step,
        "samples": fast.samples,
        "train_loss": fast.error_bits,
        "accuracy": fast.accuracy,
        "stage0/sg_loss": slow.sg_loss,
        "stage0/sg_cosine": slow.sg_cosine,
        "slow_wait_s": slow.wait_s,
        "fast_chunks": fast.chunks,
    }
