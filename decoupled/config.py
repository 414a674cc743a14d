"""Experiment configuration: one dataclass per component, loaded from YAML, checked as a whole.

The dataclasses are the schema. Field metadata carries what a type cannot say:
``choices`` (allowed values), ``min``/``max`` (inclusive range), ``gt`` (strict lower bound),
``backend`` (the one ``runtime.backend`` that reads the key: any other value than its default
with another backend is refused, since it would be silently ignored).
``load_config``/``parse_config`` check a raw mapping against the type hints and metadata, then
the rules that span fields. Every problem is collected and reported at once, each with its dotted
key path, so a user fixes a config in one round trip.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Final, Union, get_args, get_origin, get_type_hints

import yaml

METHODS = ("backprop", "pipeline", "dni", "cdni", "dgl", "delayed", "ddp")
# Methods whose K workers are replicas of the whole model rather than a chain of its slices.
REPLICA_METHODS = ("ddp",)
DATASETS = ("digits", "mnist", "mnist10k", "fashion_mnist", "cifar10", "teacher")
MODELS = ("fcn", "cnn", "resnet", "lstm", "gpt")
# Sequence tasks of the recurrent model (decoupled/recurrent/).
RECURRENT_DATASETS = ("copy", "repeat_copy", "charlm", "lag_copy")
# Text as (B, T) token windows with (B, T) next-token labels, for model.name=gpt.
TEXT_DATASETS = ("charlm",)
# The task of two lstm cores at two clock rates (stages=2; decoupled/recurrent/clock.py).
CLOCK_DATASETS = ("lag_copy",)
RECURRENT_METHODS = ("backprop", "dni")


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass
class TeacherConfig:
    """``data.name=teacher``: Gaussian inputs labelled by a deep random network (teacher.py).

    Deeper teachers, larger gains, more classes and more input dimensions draw more convoluted
    class boundaries: the task's difficulty.
    """

    train_samples: int = field(default=50_000, metadata={"min": 1})
    test_samples: int = field(default=10_000, metadata={"min": 1})
    input_dim: int = field(default=32, metadata={"min": 1})
    classes: int = field(default=10, metadata={"min": 2})
    depth: int = field(default=4, metadata={"min": 1})  # hidden tanh layers of the teacher
    width: int = field(default=256, metadata={"min": 1})
    # Weights of variance gain**2 / fan_in: larger is rougher (harder), smaller is smoother.
    gain: float = field(default=1.0, metadata={"gt": 0.0})
    # Apart from the run's seed, so every run seed trains on the same task.
    seed: int = field(default=0, metadata={"min": 0, "max": 2**63 - 1})


@dataclass
class DataConfig:
    # A built-in dataset, or "module:function" returning yours (decoupled/factories.py).
    name: str = field(
        default="digits", metadata={**_choices(*DATASETS, *RECURRENT_DATASETS), "factory": True}
    )
    root: str = "data"
    batch_size: int = field(default=64, metadata={"min": 1})
    eval_batch_size: int = field(default=512, metadata={"min": 1})
    download: bool = False
    # DataLoader worker processes reading the map-style torch Datasets a data.name factory
    # returns, in stage 0's actor (0: in the stage's own process); batches do not depend on it.
    workers: int = field(default=0, metadata={"min": 0})
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


@dataclass
class ModelConfig:
    # A built-in model, or "module:function" returning your blocks (decoupled/factories.py).
    name: str = field(default="fcn", metadata={**_choices(*MODELS), "factory": True})
    # fcn: number of linear layers including the output layer (the paper's "layers").
    # cnn: number of 5x5 conv blocks before the linear classifier. lstm: stacked LSTM layers.
    # resnet: residual blocks in each of the three residual stages (ResNet-(6n+2); 3 = ResNet-20).
    # gpt: transformer blocks (one block each).
    layers: int = field(default=3, metadata={"min": 1})
    # fcn: units per hidden layer; cnn: filters per conv; resnet: channels of the first residual
    # stage (doubled at each of the other two); gpt: d_model, the width of every token's vector.
    hidden: int = field(default=256, metadata={"min": 1})
    batch_norm: bool = True
    # Where each stage after the first begins, as block indices; "auto": split by the blocks'
    # measured cost, the method's boundary work included (decoupled/balance.py); "even" (or []):
    # as evenly as possible by block count.
    boundaries: list[int] | str = "auto"
    # lstm: truncation T, the steps of one segment of truncated BPTT.
    bptt: int = field(default=8, metadata={"min": 1})
    # gpt: attention heads of every block (they divide model.hidden).
    heads: int = field(default=4, metadata={"min": 1})
    # gpt: the context T, characters per window (the data comes in windows of this length).
    context: int = field(default=64, metadata={"min": 1})
    # gpt: dropout rate of the embeddings, the attention and the residual branches.
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})


@dataclass
class SGConfig:
    # Hidden layers of the synthesizer (0 = linear SG, as in much of the paper).
    layers: int = field(default=1, metadata={"min": 0})
    hidden: int = field(default=256, metadata={"min": 1})
    lr: float = field(default=1e-4, metadata={"gt": 0.0})
    # Multiplies the synthesizer's output before it is used as a gradient (Czarnecki et al. 2017).
    scale: float = field(default=1.0, metadata={"gt": 0.0})
    # Activations kept per stage waiting for their target; older ones are dropped and counted.
    history: int = field(default=64, metadata={"min": 1})
    # Train the synthesizer on the target of every n-th step only: its training is most of a
    # stage's DNI overhead (three passes of M per target), the prediction is every step.
    train_every: int = field(default=1, metadata={"min": 1})
    # true: the output layer starts at zero, weights and bias, so M predicts exactly 0 until it
    # has been trained (Jaderberg et al. 2016). false: only its weights do; its bias, and a bias
    # of the label projection (cDNI), keep PyTorch's default init, as koz4k/dni-pytorch's
    # synthesizers: M starts from a small random constant (docs/accuracy.md, section 3).
    zero_start: bool = True
    # Every this many steps one batch also gets its exact gradient at every stage boundary,
    # through the stages as evaluation goes, to compare each synthetic gradient with (0: never).
    probe_every: int = field(default=50, metadata={"min": 0})


@dataclass
class DGLConfig:
    # Hidden layers of each stage's auxiliary classifier (0: a linear head).
    layers: int = field(default=1, metadata={"min": 0})
    hidden: int = field(default=256, metadata={"min": 1})
    # Feature maps are average-pooled to pool x pool before the head (DGL's auxiliary nets).
    pool: int = field(default=2, metadata={"min": 1})
    # Asynchronous DGL: a stage whose next input is not ready yet trains again on one of its
    # last `replay` inputs, drawn at random, instead of waiting (0: off; it waits).
    replay: int = field(default=0, metadata={"min": 0})


@dataclass
class MethodConfig:
    name: str = field(default="cdni", metadata=_choices(*METHODS))
    sg: SGConfig = field(default_factory=SGConfig)
    # dgl: each stage's auxiliary classifier.
    dgl: DGLConfig = field(default_factory=DGLConfig)
    # In-process trainer only: steps between a target being computed and its delivery.
    delay: int = field(default=0, metadata={"min": 0, "backend": "local"})
    # pipeline: micro-batches per batch (GPipe).
    micro_batches: int = field(default=4, metadata={"min": 1})


@dataclass
class StageOptimConfig:
    # The stage (0-based) these settings are for.
    stage: int = field(default=0, metadata={"min": 0})
    # Its learning rate and weight decay instead of optim.lr / optim.weight_decay (null: those).
    lr: float | None = field(default=None, metadata={"gt": 0.0})
    weight_decay: float | None = field(default=None, metadata={"min": 0.0})


@dataclass
class OptimConfig:
    # adamw: Adam with decoupled weight decay (Loshchilov & Hutter).
    name: str = field(default="adam", metadata=_choices("adam", "adamw", "sgd"))
    lr: float = field(default=1e-3, metadata={"gt": 0.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    # Learning rate over the run after the warm-up: constant, or a cosine decay to min_lr_ratio.
    schedule: str = field(default="constant", metadata=_choices("constant", "cosine"))
    # Updates over which the learning rate rises linearly to its value (0: none).
    warmup_steps: int = field(default=0, metadata={"min": 0})
    # The cosine's floor, as a fraction of the learning rate.
    min_lr_ratio: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    # Clip each stage's gradient norm to this before its update (0: no clipping).
    clip_norm: float = field(default=0.0, metadata={"min": 0.0})
    # Backward passes (batches, or GPipe steps) whose averaged gradients make one update.
    accumulate: int = field(default=1, metadata={"min": 1})
    # Per-stage learning rate / weight decay, e.g. [{stage: 0, lr: 3e-4}].
    per_stage: list[StageOptimConfig] = field(default_factory=list)
    # torch's fused kernel for the update (one pass over each parameter instead of a loop of
    # elementwise ops; CPU and CUDA), the stages' and the synthesizers': 3-16% faster steps on
    # CPU (docs/performance.md), equal to the default up to rounding.
    fused: bool = False


@dataclass
class TrainConfig:
    epochs: int = field(default=20, metadata={"min": 1})
    # When set, overrides epochs: the run stops after this many batches.
    steps: int | None = field(default=None, metadata={"min": 1})
    eval_every: int = field(default=0, metadata={"min": 0})  # steps; 0 = at the end of each epoch
    log_every: int = field(default=10, metadata={"min": 1})
    progress: bool = True
    # Autocast of every stage's forward pass, loss and synthesizer: bf16 (CPU or GPU), fp16
    # (GPU only, with a loss scaler per stage); weights and boundary activations stay fp32.
    precision: str = field(default="fp32", metadata=_choices("fp32", "bf16", "fp16"))


@dataclass
class RuntimeConfig:
    backend: str = field(default="ray", metadata=_choices("ray", "local"))
    address: str | None = None
    transport: str = field(default="auto", metadata=_choices("auto", "ray", "torch"))
    # "auto" or a number of GPUs per stage actor (fractions share a device). The local backend
    # puts every stage on cuda:0 for any share above 0, and for "auto" when there is a GPU.
    gpus_per_stage: float | str = "auto"
    cpus_per_stage: float = field(default=1.0, metadata={"gt": 0.0})
    # Messages per channel. Deeper channels add target staleness and, with balanced stages, no
    # throughput: bench/capacity.py measures both (docs/performance.md).
    channel_capacity: int = field(default=2, metadata={"min": 1})
    # Ray runtime: targets are applied in strict step order with one batch in flight.
    lockstep: bool = field(default=False, metadata={"backend": "ray"})
    # Restarts from the last complete checkpoint after a stage dies, hangs or stops answering.
    max_failures: int = field(default=3, metadata={"min": 0})
    # Limit for joining the cluster (runtime.address), placing the stages and opening their
    # process group.
    timeout_s: float = field(default=600.0, metadata={"gt": 0.0})
    # A run whose last stage makes no step for this long (or a stage that does not answer a
    # poll for this long) counts as a failure.
    stall_timeout_s: float = field(default=120.0, metadata={"gt": 0.0})


@dataclass
class WandbConfig:
    mode: str = field(default="disabled", metadata=_choices("disabled", "offline", "online"))
    project: str = "decoupled"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = field(default=0, metadata={"min": 0})  # steps; 0 = only at the end
    keep: int = field(default=2, metadata={"min": 1})


@dataclass
class RecurrentConfig:
    """Sequence tasks of the lstm model (decoupled/recurrent/)."""

    # copy, repeat_copy: the curriculum starts at this length and raises it by one whenever the
    # error (bits per written character, over the last `window` batches) is below `threshold`.
    start_length: int = field(default=1, metadata={"min": 1})
    max_length: int = field(default=1000, metadata={"min": 1})
    threshold: float = field(default=0.15, metadata={"gt": 0.0})
    window: int = field(default=10, metadata={"min": 1})
    alphabet: int = field(default=8, metadata={"min": 2})
    # repeat_copy: each batch copies its characters R times, R drawn from 1..repeats.
    repeats: int = field(default=2, metadata={"min": 1})
    # dni: the auxiliary task of predicting the synthetic gradient T steps ahead; 0 = off.
    aux_weight: float = field(default=0.0, metadata={"min": 0.0})
    # charlm: held-out characters scored for bits per character (0 = the whole held-out split);
    # model.name=gpt scores them too, in windows of model.context.
    eval_chars: int = field(default=100_000, metadata={"min": 0})


@dataclass
class ClockConfig:
    """Two lstm cores at two clock rates (model.name=lstm with stages=2; recurrent/clock.py)."""

    # k: the slow core ticks once every k steps, on those k steps' inputs at once.
    every: int = field(default=4, metadata={"min": 1})
    # Units of the slow core's LSTM layers (model.hidden: the fast core's).
    slow_hidden: int = field(default=128, metadata={"min": 1})
    # Width of the slow core's output, which the fast core reads at every step.
    interface: int = field(default=32, metadata={"min": 1})
    # Decoupled, on threads or actors: the most ticks the slow core may be ahead of the newest
    # true gradient it has received (it waits beyond that); 0: unbounded, it never waits.
    max_ahead: int = field(default=0, metadata={"min": 0})
    # An artificial pause per chunk of each core (tests and benchmarks of the waiting).
    slow_delay_s: float = field(default=0.0, metadata={"min": 0.0})
    fast_delay_s: float = field(default=0.0, metadata={"min": 0.0})


@dataclass
class Config:
    # numpy's legacy seeding accepts only 0 .. 2**32 - 1.
    seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1})
    stages: int = field(default=2, metadata={"min": 1})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    recurrent: RecurrentConfig = field(default_factory=RecurrentConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)


# --- loading and validation -------------------------------------------------------------------

# (dotted key path, problem); kept apart until the end so cross-field checks can skip fields that
# already failed instead of piling a second, misleading complaint on top.
_Found = list[tuple[str, str]]

# Returned by _convert for a value it rejected; distinct from None, which is a valid value.
_INVALID: Final = object()

_TYPE_NAMES: Final[dict[Any, str]] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
}

# Values quoted in messages may come from a hostile or huge YAML file (aliases can make a
# small file expand enormously), so their repr is bounded.
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 40, 40, 4, 4


class ConfigError(Exception):
    """One or more problems with a configuration.

    ``str()`` lists each problem on its own line as ``key.path: problem``.
    """

    problems: list[str]

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        # Passing the list to Exception keeps the error picklable (Ray ships exceptions between
        # processes and rebuilds them from args).
        super().__init__(self.problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


def block_count(model: ModelConfig) -> int:
    """Number of blocks the model is split into stages by."""
    if model.name == "fcn":
        return model.layers
    if model.name == "cnn":
        return model.layers + 1  # the conv blocks, then the linear classifier head
    if model.name == "resnet":
        return 3 * model.layers + 2  # the stem, every residual block, the classifier head
    if model.name == "lstm":
        return 1  # one core; recurrent models are not split into stages yet
    if model.name == "gpt":
        return model.layers  # the embedding rides with the first block, the LM head the last
    raise ValueError(f"unknown model {model.name!r}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML experiment file, apply ``KEY=VALUE`` overrides and check the result."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config file: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as err:
        raise ConfigError(_yaml_problem(err, str(path))) from None
    return parse_config(raw, overrides, source=str(path))


def parse_config(
    raw: Mapping[str, Any] | None, overrides: Sequence[str] = (), source: str = "<config>"
) -> Config:
    """Check a raw mapping (as loaded from YAML) plus overrides; ConfigError lists every problem."""
    if raw is None:  # an empty file
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {_show(raw)}")
    # The caller's mapping must not change under them when overrides are applied.
    data = copy.deepcopy(dict(raw))
    found: _Found = []
    _apply_overrides(data, overrides, found)
    cfg = _convert(data, Config, "", found)
    assert isinstance(cfg, Config)  # a mapping at the top always builds one
    _cross_check(cfg, found)
    if found:
        raise ConfigError([f"{key}: {problem}" for key, problem in found])
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain nested dict of YAML-safe values; ``parse_config`` makes an equal Config of it."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    Path(path).write_text(text, encoding="utf-8")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """Set each ``dotted.key=VALUE`` (VALUE read as YAML) in ``raw``; return the problems found."""
    found: _Found = []
    _apply_overrides(raw, overrides, found)
    return [f"{key}: {problem}" for key, problem in found]


def _apply_overrides(raw: dict[str, Any], overrides: Sequence[str], found: _Found) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not all(parts):
            found.append(
                (f"override {item!r}", "expected KEY=VALUE with a dotted KEY, e.g. optim.lr=0.01")
            )
            continue
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError) as err:
            found.append((key, f"cannot read the value of override {item!r}: {_yaml_problem(err)}"))
            continue
        # Walk the schema rather than the raw dict, so a typo is caught here, where it can be
        # blamed on the command line, instead of looking like a problem in the file.
        node, cls, path = raw, Config, ""
        for depth, name in enumerate(parts):
            path = _join(path, name)
            names = [f.name for f in dataclasses.fields(cls)]
            if name not in names:
                found.append((path, f"{_unknown_key(name, names)} (in override {item!r})"))
                break
            if depth == len(parts) - 1:
                node[name] = value
                break
            hint = _hints(cls)[name]
            if not _is_section(hint):
                found.append((path, f"is a single value, not a section (in override {item!r})"))
                break
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            elif isinstance(child, Mapping) and not isinstance(child, dict):
                child = node[name] = dict(child)
            elif not isinstance(child, dict):
                found.append(
                    (path, f"is not a mapping in the config, cannot apply override {item!r}")
                )
                break
            node, cls = child, hint


def _convert(value: Any, hint: Any, path: str, found: _Found) -> Any:
    """``value`` checked against the type ``hint`` (converted where YAML is loose), or _INVALID."""
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        lists = [arm for arm in get_args(hint) if get_origin(arm) is list]
        if isinstance(value, list) and lists:
            # A list can only be meant for the list arm: its items' problems are the useful ones.
            return _convert(value, lists[0], path, found)
        for arm in get_args(hint):
            trial: _Found = []
            result = _convert(value, arm, path, trial)
            if not trial:
                return result
        return _reject(found, path, f"expected {_describe(hint)}", value)
    if origin is list:
        if not isinstance(value, list):
            return _reject(found, path, "expected a list", value)
        (item_hint,) = get_args(hint)
        items = [_convert(v, item_hint, f"{path}[{i}]", found) for i, v in enumerate(value)]
        return _INVALID if any(item is _INVALID for item in items) else items
    if _is_section(hint):
        return _convert_section(value, hint, path, found)
    # bool is an int in Python but `batch_size: true` is never what the user meant.
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and not isinstance(value, bool) and isinstance(value, int | float | str):
        # YAML 1.1 reads `1e-4` (no dot) as a string, so numeric strings are numbers here.
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return _reject(found, path, "expected a number", value)
        if not math.isfinite(number):
            return _reject(found, path, "expected a finite number", value)
        return number
    if hint is str and isinstance(value, str):
        return value
    if hint in _TYPE_NAMES:
        problem = f"expected {_describe(hint)}"
        if hint is str and value is not None and not isinstance(value, list | dict):
            # YAML reads `project: 2024` or `name: no` as a number or a boolean.
            problem += " (quote the value)"
        return _reject(found, path, problem, value)
    raise TypeError(f"{path}: the schema uses an unsupported type {hint!r}")


def _convert_section(value: Any, cls: type[Any], path: str, found: _Found) -> Any:
    # A section whose keys are all commented out loads as null; treat it as empty, not an error.
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        return _reject(found, path, "expected a mapping of keys", value)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        key_path = _join(path, str(key))
        f = fields.get(key) if isinstance(key, str) else None
        if f is None:
            found.append((key_path, _unknown_key(str(key), list(fields))))
            continue
        converted = _convert(item, hints[f.name], key_path, found)
        if converted is not _INVALID:
            _check_metadata(converted, f.metadata, key_path, found)
            kwargs[f.name] = converted
    return cls(**kwargs)


def _check_metadata(value: Any, meta: Mapping[str, Any], path: str, found: _Found) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    user_code = meta.get("factory") and ":" in value
    if choices is not None and value not in choices and not user_code:
        also = " or 'module:function' (your own code)" if meta.get("factory") else ""
        found.append((path, f"must be one of: {', '.join(choices)}{also}; got {_show(value)}"))
    if "min" in meta and value < meta["min"]:
        found.append((path, f"must be >= {_num(meta['min'])}, got {_show(value)}"))
    if "max" in meta and value > meta["max"]:
        found.append((path, f"must be <= {_num(meta['max'])}, got {_show(value)}"))
    if "gt" in meta and value <= meta["gt"]:
        found.append((path, f"must be > {_num(meta['gt'])}, got {_show(value)}"))


def _cross_check(cfg: Config, found: _Found) -> None:
    bad = [key for key, _ in found]

    def valid(*paths: str) -> bool:
        return not any(_overlaps(b, p) for b in bad for p in paths)

    def add(key: str, problem: str) -> None:
        found.append((key, problem))

    model, stages = cfg.model, cfg.stages
    if valid("model.name", "data.name", "method.name", "runtime.backend", "stages", "train.steps"):
        _check_recurrent(cfg, add)
    # A user's model has as many blocks as its factory returns: checked when it is built.
    user_model = ":" in model.name
    if valid("model.name", "model.layers", "stages") and model.name != "lstm" and not user_model:
        blocks = block_count(model)
        head = {
            "cnn": " (conv blocks + classifier head)",
            "resnet": " (stem + 3 x model.layers residual blocks + classifier head)",
        }.get(model.name, "")
        layers, n = _show(model.layers), _show(blocks)
        what = f"the {model.name} model with model.layers={layers} has {n} blocks{head}"
        # backprop and the replica methods never split the model, so stages splits nothing.
        splits = cfg.method.name not in ("backprop", *REPLICA_METHODS)
        if valid("method.name") and splits and stages > blocks:
            add("stages", f"{_show(stages)} stages need as many blocks, but {what}")
        bounds = model.boundaries
        if not valid("model.boundaries"):
            pass
        elif isinstance(bounds, str):
            if bounds not in ("auto", "even"):
                add(
                    "model.boundaries",
                    f"must be 'auto', 'even' or a list of block indices, got {_show(bounds)}",
                )
        elif bounds:
            if len(bounds) != stages - 1:
                add(
                    "model.boundaries",
                    f"needs {_show(stages - 1)} entries for {_show(stages)} stages "
                    f"(or [] to split evenly), got {len(bounds)}",
                )
            for i, start in enumerate(bounds):
                if not 1 <= start <= blocks - 1:
                    add(
                        f"model.boundaries[{i}]",
                        f"must be between 1 and {blocks - 1} ({what}), got {_show(start)}",
                    )
            if any(a >= b for a, b in itertools.pairwise(bounds)):
                add("model.boundaries", f"must be strictly increasing, got {_show(bounds)}")

    if valid("runtime.backend"):
        for key, owner, value, default in _backend_keys(cfg):
            if owner != cfg.runtime.backend and value != default and valid(key):
                add(
                    key,
                    f"is read only by runtime.backend={owner}, and this run has "
                    f"runtime.backend={cfg.runtime.backend}: it would be ignored "
                    f"(got {_show(value)}; leave it at {_show(default)} or set "
                    f"runtime.backend={owner})",
                )

    if (
        valid("model.name", "data.name")
        and model.name in ("cnn", "resnet")
        and cfg.data.name == "teacher"
    ):
        add(
            "model.name",
            f"{model.name} convolves images, but data.name=teacher gives vectors: "
            "use model.name=fcn",
        )

    precision = cfg.train.precision
    if valid("train.precision", "model.name") and precision != "fp32" and model.name == "lstm":
        add("train.precision", "model.name=lstm trains in fp32 only (for now)")

    if valid("data.workers", "data.name") and cfg.data.workers and ":" not in cfg.data.name:
        add(
            "data.workers",
            f"reads the torch Datasets of a data.name factory ('module:function'); "
            f"{cfg.data.name} is in memory and read by indexing: leave it at 0",
        )

    gpt = model.name == "gpt"
    if valid("model.name", "model.hidden", "model.heads") and gpt and model.hidden % model.heads:
        add(
            "model.heads",
            f"must divide model.hidden ({_show(model.hidden)}) into equal heads, "
            f"got {_show(model.heads)}",
        )

    gpus = cfg.runtime.gpus_per_stage
    if valid("runtime.gpus_per_stage") and (gpus != "auto" if isinstance(gpus, str) else gpus < 0):
        add("runtime.gpus_per_stage", f"must be 'auto' or a number >= 0, got {_show(gpus)}")

    batch, micro = cfg.data.batch_size, cfg.method.micro_batches
    if (
        valid("method.name", "method.micro_batches", "data.batch_size")
        and cfg.method.name == "pipeline"
        and batch < micro
    ):
        add(
            "data.batch_size",
            f"must be >= method.micro_batches ({_show(micro)}) for pipeline, got {_show(batch)}",
        )

    # In process, a target reaches its stage a fixed number of steps after the forward pass
    # (measured: tests/unit/test_config.py); a shorter history would drop every one of them.
    method, delay, history = cfg.method.name, cfg.method.delay, cfg.method.sg.history
    keys = ("method.name", "method.delay", "method.sg.history", "stages", "runtime.backend")
    if valid(*keys) and cfg.runtime.backend == "local" and method in ("dni", "cdni", "delayed"):
        # A synthesizer's target makes one hop; a true gradient crosses every later stage.
        need = (stages - 1) * delay + 1 if method == "delayed" else delay + 1
        if history < need:
            hops = "stages - 1) x method.delay + 1" if method == "delayed" else "method.delay + 1"
            add(
                "method.sg.history",
                f"{method} with method.delay={_show(delay)} needs at least "
                f"{'(' if method == 'delayed' else ''}{hops} = {need} kept steps, or every "
                f"target arrives after its step was dropped; got {_show(history)}",
            )

    seen: set[int] = set()
    for i, override in enumerate(cfg.optim.per_stage):
        key = f"optim.per_stage[{i}].stage"
        if valid(key, "stages") and override.stage >= stages:
            add(key, f"must be below stages ({_show(stages)}), got {_show(override.stage)}")
        elif override.stage in seen:
            add(key, f"stage {override.stage} has settings already in an earlier entry")
        seen.add(override.stage)

    if valid("method.name") and cfg.method.name in REPLICA_METHODS:
        name = cfg.method.name
        if valid("runtime.backend") and cfg.runtime.backend != "ray":
            add("runtime.backend", f"{name} runs one process per replica: use 'ray'")
        if valid("runtime.transport") and cfg.runtime.transport == "ray":
            add(
                "runtime.transport",
                f"{name} all-reduces over the torch process group: use 'torch' or 'auto'",
            )
        if valid("data.batch_size", "stages") and batch % stages:
            add(
                "data.batch_size",
                f"{name} splits each batch into {_show(stages)} equal shards (stages), "
                f"got {_show(batch)}",
            )


def _backend_keys(section: Any, path: str = "") -> list[tuple[str, str, Any, Any]]:
    """(key path, backend, value, default) of every field that one backend alone reads."""
    found = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            found += _backend_keys(value, _join(path, f.name))
        elif "backend" in f.metadata:
            found.append((_join(path, f.name), f.metadata["backend"], value, f.default))
    return found


def _check_recurrent(cfg: Config, add: Callable[[str, str], None]) -> None:
    """The lstm model and the sequence tasks go together: one local stage, or two cores at two
    clock rates (stages=2, lag_copy) on either backend; the gpt model and text go together (a
    user's dataset may give it token windows too)."""
    recurrent_data = cfg.data.name in RECURRENT_DATASETS
    if cfg.model.name == "gpt":
        if cfg.data.name not in TEXT_DATASETS and ":" not in cfg.data.name:
            add(
                "data.name",
                f"model.name=gpt reads token windows of text: use {' or '.join(TEXT_DATASETS)}, "
                f"got {cfg.data.name!r}",
            )
        return
    if cfg.model.name != "lstm":
        if recurrent_data:
            needs = "lstm or gpt" if cfg.data.name in TEXT_DATASETS else "lstm"
            add("data.name", f"{cfg.data.name!r} is a sequence task: it needs model.name={needs}")
        return
    if not recurrent_data:
        add("data.name", f"model.name=lstm needs one of: {', '.join(RECURRENT_DATASETS)}")
    if cfg.method.name not in RECURRENT_METHODS:
        add(
            "method.name",
            "model.name=lstm supports backprop (truncated BPTT) and dni (synthetic gradients "
            f"at the truncation boundaries), got {cfg.method.name!r}",
        )
    if cfg.stages == 2:  # two cores at two clock rates, on the local or the Ray backend
        if recurrent_data and cfg.data.name not in CLOCK_DATASETS:
            add(
                "data.name",
                f"model.name=lstm with stages=2 (two cores at two clock rates) needs one of: "
                f"{', '.join(CLOCK_DATASETS)}, got {cfg.data.name!r}",
            )
    elif cfg.stages != 1:
        add(
            "stages",
            "model.name=lstm runs as one stage (stages=1) or as two cores at two clock rates "
            f"(stages=2), got {cfg.stages}",
        )
    else:
        if cfg.data.name in CLOCK_DATASETS:
            add("stages", f"data.name={cfg.data.name} needs two cores: set stages=2")
        if cfg.runtime.backend != "local":
            add(
                "runtime.backend",
                "model.name=lstm with stages=1 runs with runtime.backend=local only (on Ray "
                "actors: the two-core system, stages=2 with data.name=lag_copy)",
            )
    if cfg.data.name in ("copy", "repeat_copy", *CLOCK_DATASETS) and cfg.train.steps is None:
        add("train.steps", f"data.name={cfg.data.name} has no epochs: set the number of batches")


def _hints(cls: type[Any]) -> dict[str, Any]:
    # The module uses postponed annotations, so field.type is only a string.
    return get_type_hints(cls)


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _describe(hint: Any) -> str:
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_describe(arm) for arm in get_args(hint))
    if get_origin(hint) is list:
        return "a list"
    if _is_section(hint):
        return "a mapping of keys"
    return _TYPE_NAMES.get(hint, repr(hint))


def _reject(found: _Found, path: str, problem: str, value: Any) -> object:
    found.append((path, f"{problem}, got {_show(value)}"))
    return _INVALID


def _unknown_key(key: str, allowed: list[str]) -> str:
    if "." in key:
        *sections, last = key.split(".")
        nested = f"{last}: ..."
        for section in reversed(sections):
            nested = f"{section}: {{{nested}}}"
        return f"unknown key; dotted keys are for overrides, in YAML nest it ({nested})"
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key; allowed keys: {', '.join(allowed)}"


def _yaml_problem(err: Exception, where: str = "") -> str:
    """One line for a YAML error; ``where`` (a file name) gets the ``:line:col`` of the mark."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        if err.context and err.problem:
            problem = f"{problem} ({err.context})"
        if where and mark is not None:
            return f"{where}:{mark.line + 1}:{mark.column + 1}: {problem}"
    else:
        # ReaderError (control characters) has no mark; bad dates raise plain ValueError.
        problem = " ".join(str(err).split())
    return f"{where}: {problem}" if where else problem


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _overlaps(a: str, b: str) -> bool:
    """Whether one key path is the other or lies inside it (``model`` and ``model.layers``)."""
    short, long = sorted((a, b), key=len)
    return long == short or long.startswith((short + ".", short + "["))


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    try:
        return _repr.repr(value)
    except ValueError:  # an int too long to print (Python refuses past 4300 digits)
        return f"<{type(value).__name__}>"


def _num(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)
