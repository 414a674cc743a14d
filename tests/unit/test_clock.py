"""Two cores at two clock rates (decoupled/recurrent/clock.py, clock_trainer.py): the decoupled
update against lockstep, the zero synthesizer, the mailboxes, the waiting of the two loops on
threads, the configuration and the CLI."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from decoupled.cli import main
from decoupled.config import Config, ConfigError, parse_config
from decoupled.recurrent.clock import ClockSystem, TickMailbox, build_clock
from decoupled.recurrent.clock_trainer import run_on_threads

ROOT = Path(__file__).resolve().parents[2]
BATCH = 3


def _cfg(method: str = "dni", steps: int = 6, **clock: float) -> Config:
    return parse_config(
        {
            "seed": 3,
            "stages": 2,
            "data": {"name": "lag_copy", "batch_size": BATCH},
            "model": {"name": "lstm", "layers": 1, "hidden": 5, "bptt": 2},
            "method": {"name": method, "sg": {"layers": 1, "hidden": 6, "lr": 1e-2}},
            "optim": {"name": "adam", "lr": 1e-2},
            "recurrent": {"alphabet": 3},
            "clock": {"every": 3, "slow_hidden": 4, "interface": 4, **clock},
            "train": {"steps": steps, "progress": False},
            "runtime": {"backend": "local"},
        }
    )


def _params(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 0.0) -> bool:
    return all(torch.allclose(x, y, rtol=0.0, atol=tol) for x, y in zip(a, b, strict=True))


def test_exact_gradient_at_zero_delay_gives_the_lockstep_update() -> None:
    cfg = _cfg()
    task, slow_a, fast_a = build_clock(cfg, torch.float64)
    lock = ClockSystem(task, slow_a, fast_a, BATCH, lockstep=True)
    _, slow_b, fast_b = build_clock(cfg, torch.float64)
    _, slow_c, fast_c = build_clock(cfg, torch.float64)
    assert _same(_params(slow_a.core), _params(slow_b.core))
    start = _params(slow_a.core)

    def exact(j: int, o: torch.Tensor) -> torch.Tensor:
        """The true g_j: the fast core's chunk j+1 run on a copy of it, as it is now."""
        probe = copy.deepcopy(fast_b)
        following = task.fast_input(task.chunk(j + 1, BATCH), torch.float64)
        return probe.chunk(following, o, task.chunk(j, BATCH)).grad

    forced = ClockSystem(task, slow_b, fast_b, BATCH, lockstep=False, oracle=exact)
    plain = ClockSystem(task, slow_c, fast_c, BATCH, lockstep=False)  # its own synthesizer
    for j in range(5):
        lock.step(j)
        forced.step(j)
        plain.step(j)
    assert not _same(start, _params(slow_a.core), 1e-6)  # the slow core did learn
    assert _same(_params(slow_a.core, fast_a.core), _params(slow_b.core, fast_b.core), 1e-12)
    # The synthesizer's own (early, inexact) gradient gives another update: the check can fail.
    assert not _same(_params(slow_a.core), _params(slow_c.core), 1e-6)


def test_zero_synthesizer_leaves_the_slow_core_alone_until_targets_arrive() -> None:
    task, slow, fast = build_clock(_cfg(), torch.float64)
    system = ClockSystem(task, slow, fast, BATCH, lockstep=False, delay=2)
    assert slow.synthesizer is not None
    slow0, sg0, fast0 = _params(slow.core), _params(slow.synthesizer), _params(fast.core)
    for j in range(3):  # the target of tick 0 arrives at the end of tick 2
        system.step(j)
        assert _same(slow0, _params(slow.core))
        assert not _same(fast0, _params(fast.core), 1e-9)  # the fast core learns all along
        if j < 2:
            assert _same(sg0, _params(slow.synthesizer))
    assert not _same(sg0, _params(slow.synthesizer), 1e-9)  # trained on g_0
    system.step(3)
    assert not _same(slow0, _params(slow.core), 1e-9)  # now the synthesizer's output moves it


def test_the_fast_core_reads_the_previous_chunk_through_the_slow_output() -> None:
    """The targets of chunk j+1 are chunk j's symbols: the gradient w.r.t. o_j is not zero, and
    the data are the same on every process for a seed."""
    task, slow, fast = build_clock(_cfg(), torch.float64)
    assert torch.equal(task.chunk(4, BATCH), build_clock(_cfg())[0].chunk(4, BATCH))
    assert not torch.equal(task.chunk(4, BATCH), task.chunk(5, BATCH))
    result = ClockSystem(task, slow, fast, BATCH, lockstep=True).step(0)
    assert result.grad.shape == (BATCH, 4) and result.grad.abs().sum() > 0
    assert result.counted == 3 * BATCH


def test_mailbox_keeps_the_newest_and_counts_what_it_drops() -> None:
    box = TickMailbox(2)
    for tick in range(4):
        box.put(tick, torch.full((1,), float(tick)))
    assert box.dropped == 2
    taken = box.take_newest(0.0)
    assert taken is not None and taken[0] == 3 and taken[2] == 1  # passed over tick 2
    assert box.take_newest(0.01) is None
    box.put(5, torch.zeros(1))
    box.put(6, torch.ones(1))
    got = box.take(6, 0.0)
    assert got is not None and got.item() == 1.0 and box.drain() == []  # 5 was discarded
    assert box.take(7, 0.01) is None
    assert not box.wait(0.01)
    box.put(8, torch.zeros(1))
    assert box.wait(0.0) and box.wait(0.0)  # waiting takes nothing
    box.put(9, torch.ones(1))
    oldest = box.take_oldest(0.0)
    assert oldest is not None and oldest[0] == 8
    assert [t for t, _ in box.drain()] == [9]
    threading.Timer(0.05, box.close).start()
    t0 = time.perf_counter()
    assert box.take_newest(5.0) is None and time.perf_counter() - t0 < 2.0


def test_decoupled_slow_core_never_waits_for_a_slowed_fast_core() -> None:
    steps, pause = 12, 0.03
    slow, fast = run_on_threads(_cfg(steps=steps, fast_delay_s=pause))
    assert slow["error"] is None and fast["error"] is None
    assert slow["chunks"] == steps and slow["wait_s"] < 0.01
    assert fast["chunks"] + fast["skipped_chunks"] >= steps - 1
    lock_slow, lock_fast = run_on_threads(_cfg("backprop", steps, fast_delay_s=pause))
    assert lock_fast["chunks"] == steps and lock_fast["skipped_chunks"] == 0
    assert lock_slow["wait_s"] > 0.8 * steps * pause  # it waited for every gradient
    # Bounded: at most one tick without its gradient, so it waits for about every other one.
    ahead_slow, ahead_fast = run_on_threads(_cfg(steps=steps, fast_delay_s=pause, max_ahead=1))
    assert ahead_fast["skipped_chunks"] == 0 and ahead_slow["chunks"] == steps
    assert ahead_slow["wait_s"] > 0.3 * steps * pause


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["stages=3"], "stages"),
        (["stages=1"], "stages"),  # lag_copy needs the two cores
        (["data.name=copy"], "data.name"),  # two cores run lag_copy only
        (["method.name=cdni"], "method.name"),
        (["train.steps=null"], "train.steps"),
    ],
)
def test_bad_two_core_configs_name_the_key(overrides: list[str], key: str) -> None:
    raw = {
        "stages": 2,
        "data": {"name": "lag_copy"},
        "model": {"name": "lstm"},
        "method": {"name": "dni"},
        "train": {"steps": 10},
    }
    parse_config(raw)  # both backends are fine as it is
    parse_config(raw, ["runtime.backend=local"])
    with pytest.raises(ConfigError) as err:
        parse_config(raw, overrides)
    assert any(p.startswith(key) for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("method", ["dni", "backprop"])
def test_cli_runs_the_two_cores_in_process(tmp_path: Path, method: str) -> None:
    out = tmp_path / method
    code = main(
        [
            "train",
            str(ROOT / "configs" / "copy_twotimescale.yaml"),
            "runtime.backend=local",
            f"method.name={method}",
            "train.steps=30",
            "train.log_every=10",
            "train.progress=false",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == ("decoupled" if method == "dni" else "lockstep")
    assert summary["steps"] == summary["slow_chunks"] == summary["fast_chunks"] == 30
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["error_bits"] > 0
    assert [s["role"] for s in summary["stages"]] == ["slow", "fast"]
    assert summary["slow_samples_per_s"] > 0 and summary["skipped_chunks"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "train"] == [10, 20, 30]
