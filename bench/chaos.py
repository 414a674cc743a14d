"""Chaos soak: a run of several minutes on a local multi-node Ray cluster under a seeded schedule
of faults, against an undisturbed run with the same seed.

A head and two workers (separate `ray start` processes on this machine, one CPU each; the
cluster of tests/integration/cluster.py) run a two-stage `decoupled train`. Once the first cut is
sealed, the schedule (shuffled by ``--seed``) injects, a few seconds of training apart:
SIGKILL of a stage actor's process; SIGSTOP of one for ``--stall`` + 3 s (past
``runtime.stall_timeout_s``), then SIGCONT; SIGKILL of every process of a worker node that holds
a stage; SIGINT of the driver, then the same command with ``--resume``. Each fault waits for
training to be going again before the next.

Per fault it reports the steps lost (the last step the last stage reached before the restart,
less the step of the cut it restarted from) and the time from the fault to the first training
record past that cut. At the end: restarts, the final test accuracy against the undisturbed run,
stage-actor processes left on the nodes once the driver is gone (must be 0) and, per actor
process, its resident memory over its life (growth after the first third of it).

    PYTHONPATH=. .venv/bin/python bench/chaos.py --methods cdni --json bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import cell, machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the test suite's local cluster
from tests.integration.cluster import BIN, LocalCluster, local_cluster  # noqa: E402

DIGITS = ROOT / "configs" / "digits.yaml"
STAGE = "ray::StageActor"
SCHEDULE = ["kill_actor", "kill_actor", "stop_actor", "kill_node", "sigint"]
RECOVERY_TIMEOUT_S = 180.0
LIVED_S = 20.0  # a third of it (7 s) is past an actor's start-up here (torch, the cut)


def records(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl so far (a last line being written is left out)."""
    path = out / "metrics.jsonl"
    found = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return found


def stage_pids(cluster: LocalCluster, nodes: list[int]) -> dict[int, int]:
    """Live stage-actor processes: pid -> node."""
    return {pid: n for n in nodes for pid in cluster.pids(n, STAGE)}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class MemoryLog:
    """Resident memory of every stage-actor process, sampled each second on a thread."""

    def __init__(self, cluster: LocalCluster, nodes: list[int]) -> None:
        self.cluster, self.nodes = cluster, nodes
        self.samples: dict[int, list[tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for pid in stage_pids(self.cluster, list(self.nodes)):
                rss = rss_mb(pid)
                if rss is not None:
                    self.samples.setdefault(pid, []).append((time.monotonic(), rss))

    def close(self) -> list[dict[str, Any]]:
        """Per actor process: samples, RSS a third of the way into its life, peak, growth."""
        self._stop.set()
        self._thread.join(timeout=5)
        lives = []
        for pid, samples in self.samples.items():
            if len(samples) < 6:  # a process killed before it got going
                continue
            third = samples[len(samples) // 3][1]
            peak = max(rss for _, rss in samples[len(samples) // 3 :])
            lives.append(
                {
                    "pid": pid,
                    "seconds": samples[-1][0] - samples[0][0],
                    "rss_third_mb": third,
                    "rss_peak_mb": peak,
                    "growth_mb": peak - third,
                }
            )
        return lives


class Driver:
    """The `decoupled train` process of one run (a new one after SIGINT + --resume)."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.command, self.env, self.log = command, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.command, *extra], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)


def wait_until(what: str, found: Any, driver: Driver, timeout: float = RECOVERY_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if value:
            return value
        if not driver.alive():
            raise RuntimeError(f"the run ended before {what}; see {driver.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:g}s; see {driver.log}")
        time.sleep(0.1)


def last_step(out: Path) -> int:
    return max((r["step"] for r in records(out) if r.get("event") == "train"), default=0)


def training_after(out: Path, start: int, step: int) -> bool:
    """Whether a train record past ``step`` follows record number ``start``."""
    return any(r.get("event") == "train" and r["step"] > step for r in records(out)[start:])


def command(method: str, args: argparse.Namespace, cluster: LocalCluster, out: Path) -> list[str]:
    return [
        str(BIN / "decoupled"),
        "train",
        str(DIGITS),
        f"method.name={method}",
        "stages=2",
        f"seed={args.seed}",
        f"train.steps={args.steps}",
        f"checkpoint.every={args.every}",
        f"runtime.address={cluster.address}",
        "runtime.timeout_s=60",
        f"runtime.stall_timeout_s={args.stall}",
        "runtime.max_failures=20",
        "train.progress=false",
        "--out",
        str(out),
    ]


def inject(
    fault: str,
    cluster: LocalCluster,
    nodes: list[int],
    driver: Driver,
    out: Path,
    rng: random.Random,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Inject ``fault`` and wait until training goes on; what it cost."""
    pids = stage_pids(cluster, nodes)
    seen = len(records(out))
    before = last_step(out)
    started = time.monotonic()
    target = ""
    if fault == "kill_actor":
        pid = rng.choice(sorted(pids))
        os.kill(pid, signal.SIGKILL)
        target = f"pid {pid} on node {pids[pid]}"
    elif fault == "stop_actor":
        pid = rng.choice(sorted(pids))
        os.kill(pid, signal.SIGSTOP)
        # SIGCONT after the stall timeout (the controller kills it first; a kill reaches a
        # stopped process, and SIGCONT to a dead one is refused, which is fine).
        threading.Timer(args.stall + 3, lambda: _signal(pid, signal.SIGCONT)).start()
        target = f"pid {pid} on node {pids[pid]}"
    elif fault == "kill_node":
        node = rng.choice(sorted({n for n in pids.values() if n != 0}))
        cluster.kill_node(node)
        nodes.remove(node)
        target = f"worker node {node}"
    elif fault == "sigint":
        assert driver.process is not None
        driver.process.send_signal(signal.SIGINT)
        code = driver.wait(timeout=120)
        if code != 128 + signal.SIGINT:
            raise RuntimeError(f"the driver exited with {code} after SIGINT; see {driver.log}")
        reached = last_step(out)
        seen = len(records(out))
        driver.start("--resume", str(out))
        cut = _resumed_from(out, driver, seen)
        wait_until("training after the resume", lambda: training_after(out, seen, cut), driver)
        return {
            "fault": fault,
            "target": "driver",
            "step": before,
            "cut": cut,
            "steps_lost": reached - cut,
            "to_training_s": time.monotonic() - started,
        }
    restart = wait_until(
        "a restart",
        lambda: next((r for r in records(out)[seen:] if r.get("event") == "restart"), None),
        driver,
    )
    # The last step the last stage reached before the restart was reported.
    index = records(out).index(restart)
    reached = max(
        [before] + [r["step"] for r in records(out)[seen:index] if r.get("event") == "train"]
    )
    cut = restart["step"]
    wait_until("training after the restart", lambda: training_after(out, index, cut), driver)
    return {
        "fault": fault,
        "target": target,
        "step": before,
        "cut": cut,
        "steps_lost": reached - cut,
        "to_training_s": time.monotonic() - started,
        "reason": restart["reason"][:100],
    }


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _resumed_from(out: Path, driver: Driver, seen: int) -> int:
    """The cut the resumed run starts from: the newest sealed one."""
    from decoupled.checkpoint import complete_steps

    steps = complete_steps(out / "checkpoints")
    if not steps:
        raise RuntimeError(f"no sealed cut to resume from; see {driver.log}")
    return steps[-1]


def soak(method: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    plan = list(SCHEDULE)
    rng.shuffle(plan)
    (logs / "cluster").mkdir()
    with local_cluster(logs / "cluster", workers=2) as cluster:
        nodes = [0, 1, 2]
        undisturbed = logs / "undisturbed"
        calm = Driver(command(method, args, cluster, undisturbed), cluster.env, logs / "calm.log")
        calm.start()
        if calm.wait(timeout=1800) != 0:
            raise RuntimeError(f"the undisturbed run failed; see {calm.log}")
        out = logs / "soak"
        driver = Driver(command(method, args, cluster, out), cluster.env, logs / "soak.log")
        memory = MemoryLog(cluster, nodes)
        started = time.monotonic()
        driver.start()
        faults = []
        try:
            from decoupled.checkpoint import complete_steps

            wait_until("a sealed cut", lambda: complete_steps(out / "checkpoints"), driver)
            for fault in plan:
                time.sleep(rng.uniform(args.gap / 2, args.gap))
                if not driver.alive():
                    raise RuntimeError(f"the run ended before the {fault}: raise --steps")
                faults.append(inject(fault, cluster, nodes, driver, out, rng, args))
                print(json.dumps(faults[-1]), flush=True)
            code = driver.wait(timeout=1800)
            if code != 0:
                raise RuntimeError(f"the soak run exited with {code}; see {driver.log}")
            soak_s = time.monotonic() - started
            time.sleep(3)  # Ray reaps a finished job's actors
            leftover = len(stage_pids(cluster, nodes))
        finally:
            lives = memory.close()
            if driver.alive() and driver.process is not None:
                driver.process.kill()
    time.sleep(2)
    # Every process of every node's session, once the cluster is stopped.
    leftover_cluster = sum(len(cluster.processes(n)) for n in range(3))
    summary = json.loads((out / "summary.json").read_text())
    calm_summary = json.loads((undisturbed / "summary.json").read_text())
    restarts = [r for r in records(out) if r.get("event") == "restart"]
    return {
        "method": method,
        "faults": faults,
        "restarts": len(restarts),
        "soak_s": soak_s,
        "steps": summary["steps"],
        "test_accuracy": summary["test_accuracy"],
        "undisturbed_accuracy": calm_summary["test_accuracy"],
        "leftover_stage_processes": leftover,
        "leftover_cluster_processes": leftover_cluster,
        "memory": lives,
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| method | faults | restarts | worst steps lost | worst fault-to-training s | "
        "accuracy | undisturbed | leftover (stages + cluster) | peak RSS MB | "
        f"RSS growth MB (actors up >= {LIVED_S:g} s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        # A process that lived through a few seconds only was still starting in its first third.
        lived = [m for m in r["memory"] if m["seconds"] >= LIVED_S]
        growth = max((m["growth_mb"] for m in lived), default=None)
        peak = max((m["rss_peak_mb"] for m in r["memory"]), default=None)
        rows.append(
            f"| {r['method']} | {len(r['faults'])} | {r['restarts']} | "
            f"{max(f['steps_lost'] for f in r['faults'])} | "
            f"{max(f['to_training_s'] for f in r['faults']):.1f} | "
            f"{cell(r['test_accuracy'], '.4f')} | {cell(r['undisturbed_accuracy'], '.4f')} | "
            f"{r['leftover_stage_processes']} + {r['leftover_cluster_processes']} | "
            f"{cell(peak, '.0f')} | {cell(growth, '.1f')} |"
        )
    rows += ["", "| method | fault | target | step | cut | steps lost | to training s |"]
    rows.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for f in r["faults"]:
            rows.append(
                f"| {r['method']} | {f['fault']} | {f['target']} | {f['step']} | {f['cut']} | "
                f"{f['steps_lost']} | {f['to_training_s']:.1f} |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["cdni"], help="methods to soak")
    p.add_argument("--seed", type=int, default=0, help="the schedule's and the runs' seed")
    p.add_argument("--steps", type=int, default=8000, help="train.steps of each run")
    p.add_argument("--every", type=int, default=100, help="checkpoint.every")
    p.add_argument("--stall", type=float, default=8.0, help="runtime.stall_timeout_s")
    p.add_argument("--gap", type=float, default=8.0, help="most seconds of training between faults")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--table", type=Path, help="only print the tables of results saved by --json")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())["results"]))
        return
    results = []
    for method in args.methods:
        with tempfile.TemporaryDirectory(prefix=f"chaos-{method}-") as tmp:
            results.append(soak(method, args, Path(tmp)))
    print(table(results))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": vars(args) | {"json": str(args.json)},
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
