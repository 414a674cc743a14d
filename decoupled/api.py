"""The Python API: what ``decoupled train`` does, from a script or a notebook.

    import decoupled
    summary = decoupled.train("configs/digits.yaml", ["method.name=dni", "stages=2"], out="runs/a")
    summary = decoupled.train({"model": {"name": "my_pkg.models:blocks"}}, out="runs/b")

The config is a ``Config``, a mapping as YAML would load it, or the path of a YAML file, with
``KEY=VALUE`` overrides on top; your own model and data come in by name, as in a YAML file
(``model.name`` / ``data.name`` = ``"module:function"``, see ``decoupled/factories.py``), so a
run can always be written down and repeated. The run folder is the CLI's: ``config.yaml``,
``metrics.jsonl``, checkpoints, ``summary.json``; the summary is returned as well. Errors are
exceptions (``ConfigError``, ``DataError``, ``CheckpointError``, ``RunFolderError``...), which
the CLI turns into its exit codes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from decoupled.build import num_stages
from decoupled.checkpoint import CheckpointError, Cut, check_compatible, latest_cut
from decoupled.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    parse_config,
    save_config,
)
from decoupled.data import dataset_info, load_data
from decoupled.interrupt import StopRequest
from decoupled.metrics import write_summary
from decoupled.run_folder import RunFolderError, new_default, prepare


def load(config: Config | Mapping[str, Any] | str | Path, overrides: Sequence[str] = ()) -> Config:
    """A checked ``Config`` from any of the forms ``train`` takes."""
    if isinstance(config, Config):
        if not overrides:
            return config
        config = config_to_dict(config)
    if isinstance(config, str | Path):
        return load_config(config, overrides)
    return parse_config(config, overrides)


def train(
    config: Config | Mapping[str, Any] | str | Path,
    overrides: Sequence[str] = (),
    *,
    out: str | Path | None = None,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Train as configured and return the run's summary.

    ``out``: the run folder (default: a new ``runs/<time>-<method>-k<K>``); a folder that holds
    a run is refused unless ``overwrite`` (which empties it first) or ``resume`` (True: continue
    the run in ``out``; a path: continue the run there) is given. ``stop``: set its ``signum``
    from another thread to have the run write a checkpoint and raise ``Interrupted``."""
    cfg = load(config, overrides)
    if resume is True and out is None:
        raise RunFolderError("resume needs the run folder: resume=PATH, or out=PATH")
    if resume and overwrite:
        raise RunFolderError("resume continues the run in its folder, overwrite deletes it")
    folder = run_folder(cfg, out, resume, overwrite)
    cut = resume_point(cfg, folder) if resume else None
    return run_training(cfg, folder, cut, stop)


def run_folder(
    cfg: Config, out: str | Path | None, resume: bool | str | Path, overwrite: bool
) -> Path:
    """The run folder: the one to resume, a checked ``out``, or a new default one."""
    if resume and not isinstance(resume, bool):
        return Path(resume)
    if resume:
        assert out is not None
        return Path(out)
    try:
        if out is not None:
            prepare(Path(out), overwrite=overwrite)
            return Path(out)
        return new_default(Path("runs"), cfg.method.name, cfg.stages)
    except OSError as err:  # not writable, a file in the way of a parent folder
        raise RunFolderError(f"cannot create the run folder: {err}") from None


def resume_point(cfg: Config, run_dir: Path) -> Cut:
    """The last complete cut in ``run_dir``, checked against ``cfg``."""
    cut = latest_cut(run_dir / "checkpoints")
    if cut is None:
        raise CheckpointError(f"no complete checkpoint in {run_dir / 'checkpoints'} to resume")
    config = config_to_dict(cfg)
    if not isinstance(cfg.model.boundaries, list) or not cfg.model.boundaries:
        # "auto" keeps the cut's split, "even" is checked against it once the data's shape is
        # known (balance.balanced): the cut records the split it resolved to, never the word.
        config["model"]["boundaries"] = cut.config["model"]["boundaries"]
    # The two cores are two stages of the cut whatever the method (recurrent/clock_trainer.py).
    stages = 2 if cfg.model.name == "lstm" and cfg.stages == 2 else num_stages(cfg)
    check_compatible(cut, config, stages)
    return cut


def run_training(
    cfg: Config, out_dir: Path, resume: Cut | None = None, stop: StopRequest | None = None
) -> dict[str, Any]:
    """Train as configured, writing everything into ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    if cfg.model.name == "lstm" and cfg.stages == 2:  # two cores at two clock rates
        if cfg.runtime.backend == "local":
            from decoupled.recurrent.clock_trainer import run_clock_local

            summary = run_clock_local(cfg, out_dir, resume, stop)
        else:
            from decoupled.ray_runtime.clock import train_clock_on_ray

            summary = train_clock_on_ray(cfg, out_dir, resume, stop)
    elif cfg.model.name == "lstm":  # recurrent DNI: its own in-process trainer, for now
        from decoupled.recurrent.trainer import run_recurrent

        summary = run_recurrent(cfg, out_dir, resume=resume, stop=stop)
    elif cfg.runtime.backend == "local":
        from decoupled.local import LocalTrainer

        data = load_data(cfg.data, cfg.model.context, cfg.recurrent.eval_chars)
        trainer = LocalTrainer(cfg, data, out_dir, resume=resume, stop=stop)
        summary = trainer.run()
    else:
        from decoupled.ray_runtime.controller import train_on_ray

        # The driver checks the files and reads the shapes; stage 0 loads the samples.
        info = dataset_info(cfg.data, cfg.model.context, cfg.recurrent.eval_chars)
        summary = train_on_ray(cfg, info, out_dir, resume=resume, stop=stop)
    write_summary(summary, out_dir)
    return summary


__all__ = ["ConfigError", "load", "resume_point", "run_folder", "run_training", "train"]
