"""Two cores at two clock rates (decoupled/recurrent/clock.py, clock_trainer.py): the decoupled
update against lockstep, the zero synthesizer, the mailboxes, the waiting of the two loops on
threads, the configuration and the CLI; checkpoints and resume."""

from __future__ import annotations

import copy
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import decoupled
from decoupled.checkpoint import (
    CheckpointError,
    complete_steps,
    cut_dir,
    latest_cut,
    load_stage,
    read_cut,
)
from decoupled.cli import main
from decoupled.config import Config, ConfigError, config_to_dict, parse_config
from decoupled.interrupt import Interrupted, StopRequest
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


# -- checkpoints: cuts of both cores, resume, Ctrl-C ------------------------------------------


def _final_cut(run: Path) -> tuple[int, list[dict[str, Any]]]:
    cut = latest_cut(run / "checkpoints")
    assert cut is not None
    return cut.step, [load_stage(cut, index, torch.device("cpu")) for index in (0, 1)]


def _equal(a: Any, b: Any) -> bool:
    """Nested states hold the same tensors, bit for bit, and the same everything else."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _train(out: Path, method: str, steps: int, *more: str, resume: bool = False) -> dict[str, Any]:
    overrides = [f"train.steps={steps}", "checkpoint.every=3", "train.log_every=1", *more]
    summary: dict[str, Any] = decoupled.train(_cfg(method), overrides, out=out, resume=resume)
    return summary


@pytest.mark.parametrize(
    ("method", "delay"), [("backprop", 0), ("dni", 0), ("dni", 2)], ids=["lockstep", "dni", "late"]
)
def test_a_resumed_in_process_run_ends_as_an_uninterrupted_one(
    tmp_path: Path, method: str, delay: int
) -> None:
    whole = _train(tmp_path / "whole", method, 10, f"method.delay={delay}")
    assert whole["steps"] == 10 and whole["resumed_from"] is None
    _train(tmp_path / "part", method, 7, f"method.delay={delay}")  # cuts at 3, 6, 7
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir()) == [
        "step-00000006",
        "step-00000007",
    ]
    assert _final_cut(tmp_path / "part")[0] == 7
    cut = _final_cut(tmp_path / "part")[1]
    if delay:  # targets on their way to the slow core, and the outputs they will train on
        assert len(cut[0]["late"]) == delay and len(cut[0]["history"]) == delay
    resumed = _train(tmp_path / "part", method, 10, f"method.delay={delay}", resume=True)
    assert resumed["resumed_from"] == 7 and resumed["steps"] == resumed["slow_chunks"] == 10
    assert resumed["fast_chunks"] == 10 and resumed["samples"] == 3 * 3 * BATCH
    assert resumed["accuracy"] == whole["accuracy"]  # the window continued too
    end, a = _final_cut(tmp_path / "part")
    _, b = _final_cut(tmp_path / "whole")
    assert end == 10 and _equal(a, b)
    # Bit for bit, and the check can fail: the cut three ticks earlier differs.
    assert not _equal(cut[0]["core"], b[0]["core"]) and not _equal(cut[1]["core"], b[1]["core"])
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 11))  # log_every 1: the resumed run appends 8, 9, 10


def test_ctrl_c_leaves_a_cut_the_run_continues_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "whole"
    decoupled.train(_cfg("backprop", steps=9), out=whole)
    stop, original = StopRequest(), ClockSystem.step

    def step_then_signal(system: ClockSystem, j: int) -> Any:
        result = original(system, j)
        if j == 4:
            stop.signum = signal.SIGINT  # what the handler does on Ctrl-C
        return result

    monkeypatch.setattr(ClockSystem, "step", step_then_signal)
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="SIGINT at step 5") as info:
        decoupled.train(_cfg("backprop", steps=9), out=run, stop=stop)
    assert info.value.checkpoint == str(run / "checkpoints" / "step-00000005")
    monkeypatch.undo()
    assert decoupled.train(_cfg("backprop", steps=9), out=run, resume=True)["resumed_from"] == 5
    assert _equal(_final_cut(run), _final_cut(whole))


def test_the_threaded_loops_cut_at_the_agreed_ticks_and_resume_lockstep_exactly(
    tmp_path: Path,
) -> None:
    """The actors' protocol without Ray: the slow loop saves at the tick boundary and announces
    the cut; the fast one saves before reading o_N, or once its input has ended."""
    cfg = parse_config(config_to_dict(_cfg("backprop", steps=8)), ["checkpoint.every=3"])
    decoupled.train(cfg, out=tmp_path / "whole")
    root = tmp_path / "threads" / "checkpoints"
    slow, fast = run_on_threads(parse_config(config_to_dict(cfg), ["train.steps=5"]), 60.0, root)
    assert slow["saved"] == fast["saved"] == [3, 5]
    assert complete_steps(root) == [3, 5]
    # From the cut in the middle, the one the fast core wrote on taking o_3, not at its end.
    slow, fast = run_on_threads(cfg, 60.0, root, resume=read_cut(cut_dir(root, 3)))
    assert slow["chunks"] == fast["chunks"] == 8 and slow["saved"] == fast["saved"] == [6, 8]
    (end, a), (_, b) = _final_cut(tmp_path / "threads"), _final_cut(tmp_path / "whole")
    assert end == 8 and _equal(a[0]["core"], b[0]["core"]) and _equal(a[0]["state"], b[0]["state"])
    assert _equal(a[1]["core"], b[1]["core"]) and _equal(a[1]["state"], b[1]["state"])
    assert _equal(a[1]["optimizer"], b[1]["optimizer"])


def test_a_cut_of_other_cores_is_refused(tmp_path: Path) -> None:
    _train(tmp_path, "dni", 3)
    with pytest.raises(CheckpointError, match=r"clock\.every: checkpoint has 3, this run 4"):
        _train(tmp_path, "dni", 6, "clock.every=4", resume=True)


def test_cli_resume_continues_the_two_cores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = [
        "train",
        str(ROOT / "configs" / "copy_twotimescale.yaml"),
        "runtime.backend=local",
        "train.log_every=5",
        "train.progress=false",
        "checkpoint.every=5",
    ]
    assert main([*args, "train.steps=10", "--out", str(out)]) == 0
    assert main([*args, "train.steps=15", "--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == summary["slow_chunks"] == 15 and summary["resumed_from"] == 10
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "train"] == [5, 10, 15]
    assert latest_cut(out / "checkpoints") is not None
    capsys.readouterr()
    assert main([*args, "train.steps=20", "clock.interface=8", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint:" in err and "clock.interface" in err and "Traceback" not in err
