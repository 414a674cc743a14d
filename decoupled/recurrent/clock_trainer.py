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
actor did not send because the fast actor had not answered its earlier deliveries),
``resumed_from``.

Checkpoints are the feed-forward runs' cuts (``decoupled/checkpoint.py``), the slow core as
stage 0 and the fast core as stage 1, counted in slow ticks: a step is one tick (and the fast
chunk that reads it), as ``train.steps`` counts them. The cut at step N holds the slow core after
tick N-1's update and the fast core after the last chunk it read from an o_j with j < N; every
``checkpoint.every`` ticks, at the end, and on Ctrl-C (``StopRequest``). In-process the cut also
holds the targets still on their way to the slow core (``method.delay``) and its history, so a
resume continues exactly. On the actors the slow core saves at the tick boundary and tells the
fast core, which saves before it reads o_N (or once its input has ended). Lockstep resumes exactly
there too; decoupled, the targets g_j of ticks before the cut that had not reached the slow core
when it saved are lost (the cut holds no pending target; the synthesizer misses those updates).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from decoupled.checkpoint import CheckpointError, Cut, commit_cut, load_stage, save_stage
from decoupled.config import Config, config_to_dict
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.metrics import RunLog, build_summary, summary_stage_figures
from decoupled.recurrent.clock import ClockSystem, Figures, TickMailbox, build_clock
from decoupled.schedule import Schedule

# A core's hand-over to the other actor: (tick, tensor) -> the seconds it was held back waiting
# for the other (a bound on unanswered messages); submitting is the sender's own work.
Send = Callable[[int, torch.Tensor], float]
# A core's part of a cut: (step, state) -> None, written where the run's cuts are.
Save = Callable[[int, dict[str, Any]], None]
POLL_S = 0.25  # how often a waiting loop looks at its stop flag
NUM_CORES = 2  # stage 0 the slow core, stage 1 the fast one, in every cut
HOST = torch.device("cpu")
# What a resumed run must share with its cut besides checkpoint.IDENTITY_KEYS: the two cores'
# shapes and the stream.
CLOCK_KEYS = ("clock.every", "clock.slow_hidden", "clock.interface", "recurrent.alphabet")


def lockstep(cfg: Config) -> bool:
    """backprop: true gradients, the slow core waits for them; dni: synthetic gradients."""
    return cfg.method.name == "backprop"


def schedule(cfg: Config) -> Schedule:
    """When cuts are due: every ``checkpoint.every`` slow ticks and after the last one."""
    steps = cfg.train.steps or 0
    return Schedule.from_config(cfg.train, max(steps, 1), cfg.checkpoint.every)


def check_clock_cut(cut: Cut, cfg: Config) -> None:
    """Refuse a cut of other cores or another stream (the rest: ``api.resume_point``)."""
    ours = config_to_dict(cfg)

    def get(config: dict[str, Any], key: str) -> Any:
        section, name = key.split(".")
        return config.get(section, {}).get(name)

    problems = [
        f"{key}: checkpoint has {get(cut.config, key)!r}, this run {get(ours, key)!r}"
        for key in CLOCK_KEYS
        if get(cut.config, key) != get(ours, key)
    ]
    if problems:
        raise CheckpointError(
            f"{cut.path} does not fit this configuration:\n  " + "\n  ".join(problems)
        )


def save_to(root: Path, index: int) -> Save:
    """Core ``index``'s ``Save`` into the cuts under ``root``."""

    def save(step: int, state: dict[str, Any]) -> None:
        save_stage(root, step, index, state, HOST)

    return save


class CoreLoop:
    """A core's compute thread: ``start``, ``stop``, ``join``; an exception ends it and is kept
    in ``error`` for the driver's poll."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.figures = Figures(cfg.recurrent.window)
        self.error: str | None = None
        self.saved: list[int] = []  # steps of the cuts whose part this core has written
        self.first = 0  # the step this run starts at (a resumed run: its cut's)
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
            "saved": list(self.saved),
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

    def __init__(
        self,
        cfg: Config,
        send: Send,
        end: Callable[[], None],
        save: Save | None = None,
        announce: Callable[[int], None] | None = None,
    ) -> None:
        """``save``: writes this core's part of a cut (None: no checkpoints); ``announce(N)``
        tells the fast core a cut at step N is taken, before o_N is sent."""
        super().__init__(cfg)
        self.task, self.slow, _ = build_clock(cfg)
        self.targets = TickMailbox(cfg.runtime.channel_capacity)
        self.newest = -1  # the latest tick whose true gradient has come
        self._send, self._end = send, end
        self._save, self._announce = save, announce
        self._interrupt = threading.Event()

    def restore(self, cut: Cut) -> None:
        """Continue from ``cut``: ticks before it count as answered, since their targets, if
        any were still coming, went to the run that wrote it."""
        state = load_stage(cut, 0, HOST)
        self.slow.load_state_dict(state)
        self.slow.history.clear()
        self.figures.load_state_dict(state["figures"])
        self.first = cut.step
        self.newest = cut.step - 1

    def interrupt(self) -> None:
        """Take a cut at the next tick boundary, then end the run (Ctrl-C)."""
        self._interrupt.set()

    def state_dict(self) -> dict[str, Any]:
        """Stage 0 of a cut, as ``ClockSystem.state_dict(0)`` writes it, with no target pending."""
        state = self.slow.state_dict()
        return {**state, "history": [], "late": [], "figures": self.figures.state_dict()}

    def _cut(self, step: int) -> None:
        if self._save is None:
            return
        if not lockstep(self.cfg):
            self._learn(self.targets.drain())  # what has come is in the cut
        if self._announce is not None:
            self._announce(step)
        self._save(step, self.state_dict())
        self.saved.append(step)

    def run(self) -> None:
        cfg, fig = self.cfg, self.figures
        batch, timeout = cfg.data.batch_size, cfg.runtime.stall_timeout_s
        due = schedule(cfg)
        for j in range(self.first, cfg.train.steps or 0):
            if self._stop.is_set():
                break
            if self._interrupt.is_set():
                self._cut(j)
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
            if due.checkpoint_after(j):
                self._cut(j + 1)
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

    def __init__(self, cfg: Config, send: Send, save: Save | None = None) -> None:
        super().__init__(cfg)
        self.task, _, self.fast = build_clock(cfg)
        bounded = lockstep(cfg) or cfg.clock.max_ahead > 0
        # A bounded slow core has at most max_ahead + 2 outputs untaken: none is ever dropped.
        self.inputs = TickMailbox(max(cfg.runtime.channel_capacity, cfg.clock.max_ahead + 2))
        self._take = self.inputs.take_oldest if bounded else self.inputs.take_newest
        self._send, self._save = send, save
        self.last = -1  # the tick whose output the last chunk read
        self._cuts: set[int] = set()  # announced cuts this core has not yet written
        self._lock = threading.Lock()

    def restore(self, cut: Cut) -> None:
        state = load_stage(cut, 1, HOST)
        self.fast.load_state_dict(state)
        self.figures.load_state_dict(state["figures"])
        self.first = cut.step
        # A cut written in-process read every tick before it.
        self.last = state.get("last", cut.step - 1)

    def cut_at(self, step: int) -> None:
        """The slow core took a cut at ``step``: write this core's part before reading o_step."""
        with self._lock:
            self._cuts.add(step)

    def state_dict(self) -> dict[str, Any]:
        """Stage 1 of a cut, as ``ClockSystem.state_dict(1)`` writes it, and the last tick read."""
        return {**self.fast.state_dict(), "figures": self.figures.state_dict(), "last": self.last}

    def _write_cuts(self, before: int | None) -> None:
        """Write the announced cuts at steps <= ``before`` (None: all of them)."""
        with self._lock:
            due = sorted(n for n in self._cuts if before is None or n <= before)
            self._cuts.difference_update(due)
        for step in due:
            if self._save is not None:
                self._save(step, self.state_dict())
            self.saved.append(step)

    def run(self) -> None:
        cfg, fig = self.cfg, self.figures
        batch = cfg.data.batch_size
        while not self._stop.is_set():
            w0 = time.perf_counter()
            taken = self._take(POLL_S)
            t0 = time.perf_counter()
            fig.wait_s += t0 - w0
            if taken is None:
                if self.inputs.closed:
                    # Every output before the announced cuts is read: their part is final.
                    self._write_cuts(None)
                    break
                continue
            j, o, _ = taken
            last = self.last
            if j <= last:
                continue  # came after a newer one (threaded actors may run calls out of order)
            self._write_cuts(j)
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
            self.last = j
            fig.wait_s += self._send(j, result.grad)


def run_on_threads(
    cfg: Config,
    timeout_s: float = 600.0,
    checkpoints: Path | None = None,
    resume: Cut | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both loops on threads of this process, wired mailbox to mailbox as the actors are (the
    two cores then share this process's interpreter lock); their final reports. With
    ``checkpoints``, each core writes its part of the cuts there, sealed once both have ended;
    ``resume`` continues from a cut."""

    def to_slow(tick: int, grad: torch.Tensor) -> float:
        slow.targets.put(tick, grad)
        return 0.0

    def to_fast(tick: int, output: torch.Tensor) -> float:
        fast.inputs.put(tick, output)
        return 0.0

    saves = [save_to(checkpoints, i) if checkpoints is not None else None for i in (0, 1)]
    fast = FastLoop(cfg, to_slow, saves[1])
    slow = SlowLoop(cfg, to_fast, fast.inputs.close, saves[0], fast.cut_at)
    if resume is not None:
        check_clock_cut(resume, cfg)
        slow.restore(resume)
        fast.restore(resume)
    fast.start()
    slow.start()
    for loop in (slow, fast):
        if not loop.join(timeout_s):
            slow.stop()
            fast.stop()
            raise TimeoutError(f"the two cores did not finish within {timeout_s:g}s")
    if checkpoints is not None:
        for step in sorted(set(slow.saved) & set(fast.saved)):
            commit_cut(checkpoints, step, NUM_CORES, config_to_dict(cfg), cfg.checkpoint.keep)
    return slow.report(), fast.report()


def clock_summary(
    cfg: Config,
    slow: dict[str, Any],
    fast: dict[str, Any],
    wall_s: float,
    resumed_from: int | None = None,
) -> dict[str, Any]:
    """summary.json of a two-core run from each core's final ``report``; ``steps`` and the
    chunk counts include the ticks before a resumed run's cut, samples and rates do not."""
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
        figures = {k: v for k, v in fig.items() if k not in ("done", "saved")}
        stages.append({**stage, "role": role, **figures})
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
            "resumed_from": resumed_from or None,
        },
    )


def run_clock_local(
    cfg: Config,
    out_dir: Path | None,
    resume: Cut | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Both cores in this process, one after the other (``ClockSystem``): targets come
    ``method.delay`` ticks late, and neither core ever waits. Cuts into
    ``out_dir/checkpoints``; ``resume`` continues from one; a ``stop`` request writes a cut
    before the next step and raises ``Interrupted``."""
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
    first = 0
    if resume is not None:
        check_clock_cut(resume, cfg)
        for index in range(NUM_CORES):
            system.load_state_dict(index, load_stage(resume, index, HOST))
        first = resume.step
    checkpoints = out_dir / "checkpoints" if out_dir is not None else None

    def save_cut(step: int) -> Path | None:
        if checkpoints is None:
            return None
        for index in range(NUM_CORES):
            save_stage(checkpoints, step, index, system.state_dict(index), HOST)
        config = config_to_dict(cfg)
        return commit_cut(checkpoints, step, NUM_CORES, config, cfg.checkpoint.keep).path

    stop = stop or StopRequest()
    steps, due = cfg.train.steps or 0, schedule(cfg)
    with RunLog(out_dir, steps, cfg.train.progress, cfg) as log:
        log.advance(0, position=first)
        for j in range(first, steps):
            if stop.requested:
                assert stop.signum is not None
                path = save_cut(j)
                raise Interrupted(stop.signum, j, str(path) if path else None)
            system.step(j)
            time.sleep(cfg.clock.slow_delay_s + cfg.clock.fast_delay_s)
            log.advance(1)
            if due.checkpoint_after(j):
                save_cut(j + 1)
            if due.log_after(j):
                log.write(_record(j + 1, system.fast_figures, system.slow_figures, cfg))
        wall_s = log.wall_s()
    for fig in (system.slow_figures, system.fast_figures):
        fig.busy_s = wall_s
    summary = clock_summary(
        cfg,
        system.slow_figures.report(wall_s),
        system.fast_figures.report(wall_s),
        wall_s,
        resumed_from=first,
    )
    log.finish(summary)
    return summary


def _record(step: int, fast: Figures, slow: Figures, cfg: Config) -> dict[str, Any]:
    return {
        "event": "train",
        "step": step,
        "samples": step * cfg.clock.every * cfg.data.batch_size,  # before a resume too
        "train_loss": fast.error_bits,
        "accuracy": fast.accuracy,
        "stage0/sg_loss": slow.sg_loss,
        "stage0/sg_cosine": slow.sg_cosine,
        "slow_wait_s": slow.wait_s,
        "fast_chunks": fast.chunks,
    }
