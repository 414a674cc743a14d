"""``decoupled train CONFIG [KEY=VALUE ...] [--out DIR] [--resume [DIR] | --overwrite]``.

``decoupled plot RUN_DIR [--out DIR]``: PNG plots of a run from its metrics.jsonl.

``decoupled submit CONFIG [KEY=VALUE ...] [--address URL] [--no-wait]``: the same training as a
Ray job on a cluster (decoupled/ray_runtime/submit.py); its exit code follows the job's.

Exit codes: 0 success; 1 the run failed; 2 bad configuration, arguments, data files or checkpoint
(one clear message, no traceback); 130 interrupted by Ctrl-C, 143 by SIGTERM (a checkpoint is
written first).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decoupled import api
from decoupled.checkpoint import CheckpointError
from decoupled.config import ConfigError
from decoupled.config_doc import describe
from decoupled.data import DataError
from decoupled.interrupt import Interrupted, StopRequest
from decoupled.ray_runtime import submit
from decoupled.ray_runtime.connect import ClusterUnreachable
from decoupled.run_folder import RunFolderError
from decoupled.stage import NonFiniteError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


DESCRIPTION = "Train neural networks with decoupled neural interfaces, one Ray actor per stage."
EPILOG = """commands:
  decoupled train CONFIG [KEY=VALUE ...] [--out DIR] [--resume [DIR] | --overwrite]
  decoupled train CONFIG [KEY=VALUE ...] --print-config   every key, its default and meaning
  decoupled plot RUN_DIR [--out DIR]
  decoupled submit CONFIG [KEY=VALUE ...] [--address URL] [--no-wait]

exit codes: 0 success; 1 the run failed; 2 bad configuration, arguments, data files or
checkpoint; 130 interrupted by Ctrl-C, 143 by SIGTERM (a checkpoint is written first)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decoupled",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"decoupled {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from a YAML experiment")
    train.add_argument("config", type=Path, help="YAML experiment, e.g. configs/digits.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=1e-4")
    train.add_argument("--out", type=Path, help="run folder (default: runs/<time>-<method>-k<K>)")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="DIR",
        help="continue the run in DIR (default: --out) from its last complete checkpoint",
    )
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (every key, its default where it differs, what "
        "it means and its allowed values) and exit without training",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds an earlier run: delete that run's files first (without this, such a "
        "folder is refused)",
    )
    plot = commands.add_parser("plot", help="PNG plots of a run folder's metrics.jsonl")
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder")
    plot.add_argument("--out", type=Path, help="where the PNGs go (default: RUN_DIR/plots)")
    submit.add_parser(commands)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("decoupled")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def format_summary(summary: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"{summary['method']} on {summary['dataset']}, {summary['num_stages']} stage(s), "
        f"{summary['steps']} steps in {summary['wall_s']:.1f}s "
        f"({fmt(summary['samples_per_s'], '.0f')} samples/s, "
        f"{fmt(summary.get('steady_samples_per_s'), '.0f')} in the steady state)",
        f"train loss {fmt(summary['train_loss'], '.4f')}, "
        f"test accuracy {fmt(summary['test_accuracy'], '.4f')}",
        f"{'stage':>5} {'samples/s':>10} {'busy':>6} {'wait s':>7} {'SG loss':>9} {'cosine':>7} "
        f"{'stale':>6} {'p90':>4} {'dropped':>8}",
    ]
    for s in summary["stages"]:
        dropped = (s.get("targets_dropped") or 0) + (s.get("targets_expired") or 0)
        lines.append(
            f"{s['index']:>5} {fmt(s.get('samples_per_s'), '.0f'):>10} "
            f"{fmt(s.get('busy_fraction'), '.2f'):>6} {fmt(s.get('input_wait_s'), '.2f'):>7} "
            f"{fmt(s.get('sg_loss'), '.2e'):>9} {fmt(s.get('sg_cosine'), '.3f'):>7} "
            f"{fmt(s.get('staleness_mean'), '.1f'):>6} {fmt(s.get('staleness_p90'), '.0f'):>4} "
            f"{dropped:>8}"
        )
    if summary.get("bptt") is not None:  # a recurrent run (decoupled/recurrent/)
        solved, bpc = summary.get("longest_solved"), summary.get("test_bpc")
        lines.insert(
            2,
            f"truncation T={summary['bptt']}"
            + (f", longest length solved {solved}" if solved is not None else "")
            + (f", held-out {bpc:.3f} bits/char" if bpc is not None else ""),
        )
    elif summary.get("test_bpc") is not None:  # text through a chain (model.name=gpt)
        lines.insert(2, f"held-out {summary['test_bpc']:.3f} bits/char")
    wandb = summary.get("wandb")
    if wandb:
        where = wandb["url"] or f"{wandb['dir']} (offline; upload with `wandb sync`)"
        lines.append(f"W&B run: {where}")
    return "\n".join(lines)


def _fail(message: str, code: int) -> int:
    print(f"decoupled: {message}", file=sys.stderr)
    return code


def plot(run_dir: Path, out: Path | None) -> int:
    from decoupled.plot import NoMetrics, plot_run

    try:
        paths = plot_run(run_dir, out)
    except NoMetrics as err:
        return _fail(str(err), EXIT_USAGE)
    print("\n".join(str(path) for path in paths))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "plot":
        return plot(args.run_dir, args.out)
    if args.command == "submit":
        return submit.run(args)
    try:
        cfg = api.load(args.config, args.overrides)
    except ConfigError as err:
        return _fail(f"bad configuration\n{err}", EXIT_USAGE)
    if args.print_config:
        print(describe(cfg), end="")
        return EXIT_OK
    if args.resume is True and args.out is None:
        return _fail("--resume needs the run folder: --resume DIR, or --out DIR", EXIT_USAGE)
    if args.resume and args.overwrite:
        return _fail(
            "--resume continues the run in its folder and --overwrite deletes it: pass one",
            EXIT_USAGE,
        )
    try:
        out_dir = api.run_folder(cfg, args.out, args.resume, args.overwrite)
    except RunFolderError as err:
        return _fail(str(err), EXIT_USAGE)
    stop = StopRequest()
    try:
        with stop.installed():
            summary = api.train(cfg, out=out_dir, resume=bool(args.resume), stop=stop)
    except DataError as err:
        return _fail(f"data: {err}", EXIT_USAGE)
    except ConfigError as err:
        return _fail(f"bad configuration\n{err}", EXIT_USAGE)
    except CheckpointError as err:
        return _fail(f"checkpoint: {err}", EXIT_USAGE)
    except Interrupted as err:
        return _fail(f"{err}; continue with --resume {out_dir}", 128 + err.signum)
    except KeyboardInterrupt:
        return _fail("interrupted before a checkpoint could be written", 128 + signal.SIGINT)
    except NonFiniteError as err:
        return _fail(f"training stopped: {err}", EXIT_FAILED)
    except ClusterUnreachable as err:
        return _fail(f"cannot join the Ray cluster: {err}", EXIT_FAILED)
    except Exception as err:
        (out_dir / "error.log").write_text(traceback.format_exc())
        return _fail(f"run failed: {err!r} (traceback in {out_dir / 'error.log'})", EXIT_FAILED)
    print(format_summary(summary))
    print(f"run folder: {out_dir}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
