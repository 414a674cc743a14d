"""Config loading: YAML, overrides, per-field and cross-field validation, error messages."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from decoupled.config import (
    METHODS,
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    block_count,
    config_to_dict,
    load_config,
    parse_config,
    save_config,
)
from decoupled.data import Dataset
from decoupled.local import LocalTrainer
from tests.conftest import with_history


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(raw: dict[str, Any] | None, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, overrides)
    return info.value.problems


# --- loading ----------------------------------------------------------------------------------


def test_defaults_parse() -> None:
    assert parse_config(None) == Config()
    assert parse_config({}) == Config()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# nothing yet\n")) == Config()


def test_nested_yaml_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
seed: 7
stages: 3
data: {name: mnist, batch_size: 128}
model:
  name: cnn
  layers: 2
  boundaries: [1, 2]
method:
  name: dni
  sg:
    layers: 0
    scale: 0.1
runtime:
  address: auto
  gpus_per_stage: 0.5
logging:
  wandb: {mode: offline, tags: [a, b]}
""",
    )
    cfg = load_config(path)
    assert cfg.seed == 7 and cfg.stages == 3
    assert cfg.data.name == "mnist" and cfg.data.batch_size == 128
    assert cfg.data.eval_batch_size == 512  # untouched keys keep their defaults
    assert cfg.model == ModelConfig(name="cnn", layers=2, boundaries=[1, 2])
    assert cfg.method.name == "dni" and cfg.method.sg.layers == 0 and cfg.method.sg.scale == 0.1
    assert cfg.runtime.address == "auto" and cfg.runtime.gpus_per_stage == 0.5
    assert cfg.logging.wandb.mode == "offline" and cfg.logging.wandb.tags == ["a", "b"]


def test_empty_section_means_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "logging:\n  # wandb: {mode: online}\noptim:\n"))
    assert cfg == Config()


def test_exponent_without_dot_becomes_float(tmp_path: Path) -> None:
    # YAML 1.1 reads these as strings.
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-4\nmethod:\n  sg:\n    lr: 3E-5\n"))
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.method.sg.lr == pytest.approx(3e-5)


def test_int_accepted_for_float() -> None:
    cfg = parse_config({"optim": {"lr": 1, "momentum": 0}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_broken_yaml_gives_file_line_col(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr: 0.1\n  momentum: a: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:3:14: mapping values are not allowed here"]


def test_unclosed_bracket_is_reported_with_position(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  boundaries: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:3:")


def test_invalid_date_is_a_config_error(tmp_path: Path) -> None:
    # PyYAML raises a bare ValueError for a timestamp-shaped scalar that is not a real date.
    with pytest.raises(ConfigError, match="month must be in 1"):
        load_config(write(tmp_path, "data:\n  root: 2024-13-45\n"))


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("optim:\n  name: adam  # réglé\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: cannot read config file") and "utf-8" in problem


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- seed\n- stages\n")
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        load_config(path)
    assert str(path) in str(info.value)


# --- per-field problems -----------------------------------------------------------------------


def test_unknown_key_suggests_the_close_one() -> None:
    assert problems_of({"optim": {"lrr": 0.1}}) == ["optim.lrr: unknown key; did you mean 'lr'?"]
    assert problems_of({"method": {"sg": {"histroy": 3}}}) == [
        "method.sg.histroy: unknown key; did you mean 'history'?"
    ]


def test_unknown_key_without_close_match_lists_allowed() -> None:
    (problem,) = problems_of({"checkpoint": {"zzz": 1}})
    assert problem == "checkpoint.zzz: unknown key; allowed keys: every, keep"


def test_dotted_key_in_yaml_says_to_nest_it() -> None:
    (problem,) = problems_of({"optim.lr": 0.1})
    assert problem.startswith("optim.lr: unknown key") and "optim: {lr: ...}" in problem


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("data: {batch_size: abc}", "data.batch_size", "expected an integer, got 'abc'"),
        ("data: {batch_size: true}", "data.batch_size", "expected an integer, got true"),
        ("data: {batch_size: 2.0}", "data.batch_size", "expected an integer, got 2.0"),
        ("train: {progress: 3}", "train.progress", "expected true or false, got 3"),
        ("train: {steps: 2.5}", "train.steps", "expected an integer or null, got 2.5"),
        ("optim: {lr: fast}", "optim.lr", "expected a number, got 'fast'"),
        ("optim: {lr: true}", "optim.lr", "expected a number, got true"),
        ("optim: {lr: .nan}", "optim.lr", "expected a finite number"),
        ("wandb_project: 1", "wandb_project", "unknown key"),
        ("logging: {wandb: {project: 2024}}", "logging.wandb.project", "quote the value"),
        ("model: {boundaries: 2}", "model.boundaries", "a list or a string, got 2"),
        ("model: {boundaries: [1, x]}", "model.boundaries[1]", "expected an integer, got 'x'"),
        ("runtime: {gpus_per_stage: [1]}", "runtime.gpus_per_stage", "a number or a string"),
        ("data: 5", "data", "expected a mapping of keys, got 5"),
        ("data: [mnist, 64]", "data", "expected a mapping of keys, got ['mnist', 64]"),
        ("method: {sg: [1, 2]}", "method.sg", "expected a mapping of keys, got [1, 2]"),
    ],
)
def test_wrong_type(tmp_path: Path, text: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    (problem,) = info.value.problems
    assert problem.startswith(f"{key}: ")
    assert expected in problem


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"data": {"batch_size": 0}}, "data.batch_size: must be >= 1, got 0"),
        ({"optim": {"momentum": 1.5}}, "optim.momentum: must be <= 1, got 1.5"),
        ({"optim": {"lr": 0}}, "optim.lr: must be > 0, got 0.0"),
        ({"train": {"steps": 0}}, "train.steps: must be >= 1, got 0"),
        ({"seed": -1}, "seed: must be >= 0, got -1"),
    ],
)
def test_out_of_range(raw: dict[str, Any], expected: str) -> None:
    assert problems_of(raw) == [expected]


def test_bad_choice_lists_allowed_values() -> None:
    (problem,) = problems_of({"method": {"name": "foo"}})
    assert problem.startswith("method.name: must be one of: ")
    assert all(name in problem for name in METHODS)
    assert "'foo'" in problem


def test_all_problems_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
seed: x
data: {batch_size: 0, name: mnst}
optim: {lrr: 0.1, momentum: 2}
train: {progress: 3}
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["method.name=foo"])
    problems = info.value.problems
    assert len(problems) == 7
    assert str(info.value).splitlines() == problems
    keys = [p.split(":")[0] for p in problems]
    expected = ["seed", "data.batch_size", "data.name", "optim.lrr", "optim.momentum"]
    assert keys == [*expected, "train.progress", "method.name"]


def test_config_error_pickles() -> None:
    err = ConfigError(["a: b", "c: d"])
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, ConfigError) and copy.problems == err.problems
    assert ConfigError("just one").problems == ["just one"]


# --- overrides --------------------------------------------------------------------------------


def test_overrides_set_dotted_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "stages: 3\nruntime: {address: auto}\nmodel: {layers: 4}\n")
    cfg = load_config(
        path,
        [
            "optim.lr=1e-4",
            "model.boundaries=[2, 3]",
            "runtime.address=null",
            "method.sg.layers=2",
            "logging.wandb.tags=[x]",
            "train.progress=false",
            "runtime.gpus_per_stage=auto",
        ],
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.boundaries == [2, 3]
    assert cfg.runtime.address is None
    assert cfg.method.sg.layers == 2
    assert cfg.logging.wandb.tags == ["x"]
    assert cfg.train.progress is False
    assert cfg.stages == 3 and cfg.model.layers == 4


def test_later_override_wins() -> None:
    assert parse_config({}, ["seed=1", "seed=2"]).seed == 2


def test_override_does_not_change_callers_mapping() -> None:
    raw: dict[str, Any] = {"optim": {"lr": 0.5}}
    parse_config(raw, ["optim.lr=0.1"])
    assert raw == {"optim": {"lr": 0.5}}


@pytest.mark.parametrize("item", ["seed", "=3", ".lr=1", "optim..lr=1"])
def test_malformed_override(item: str) -> None:
    (problem,) = problems_of({}, (item,))
    assert problem.startswith(f"override {item!r}: expected KEY=VALUE")


def test_unknown_override_key_suggests() -> None:
    (problem,) = problems_of({}, ("optim.lrr=0.1",))
    assert problem == "optim.lrr: unknown key; did you mean 'lr'? (in override 'optim.lrr=0.1')"
    (problem,) = problems_of({}, ("optm.lr=0.1",))
    assert problem.startswith("optm: unknown key; did you mean 'optim'?")


def test_override_through_a_value() -> None:
    (problem,) = problems_of({}, ("optim.lr.x=1",))
    assert problem.startswith("optim.lr: is a single value, not a section")
    problems = problems_of({"optim": 3}, ("optim.lr=1",))
    assert problems[0].startswith("optim: is not a mapping in the config")
    assert problems[1] == "optim: expected a mapping of keys, got 3"


def test_override_value_must_be_yaml() -> None:
    (problem,) = problems_of({}, ("model.boundaries=[2,",))
    assert problem.startswith("model.boundaries: cannot read the value of override")


def test_override_value_is_validated() -> None:
    assert problems_of({}, ("data.batch_size=abc",)) == [
        "data.batch_size: expected an integer, got 'abc'"
    ]


def test_apply_overrides_helper() -> None:
    raw: dict[str, Any] = {"optim": None}
    assert apply_overrides(raw, ["optim.lr=0.5", "stages=3", "nope=1"]) == [
        "nope: unknown key; allowed keys: seed, stages, data, model, method, optim, train, "
        "runtime, logging, checkpoint, recurrent, clock (in override 'nope=1')"
    ]
    assert raw == {"optim": {"lr": 0.5}, "stages": 3}


# --- cross-field checks -----------------------------------------------------------------------


def test_block_count() -> None:
    assert block_count(ModelConfig(name="fcn", layers=3)) == 3
    assert block_count(ModelConfig(name="cnn", layers=2)) == 3


@pytest.mark.parametrize(
    ("stages", "model"),
    [
        (3, {"layers": 3, "boundaries": [1, 2]}),
        (3, {"layers": 3, "boundaries": []}),
        (3, {"name": "cnn", "layers": 2, "boundaries": [1, 2]}),
        (1, {"layers": 1}),
    ],
)
def test_valid_splits(stages: int, model: dict[str, Any]) -> None:
    cfg = parse_config({"stages": stages, "model": model})
    assert cfg.stages == stages


@pytest.mark.parametrize(
    ("stages", "model", "expected"),
    [
        (3, {"layers": 3, "boundaries": [1]}, "model.boundaries: needs 2 entries for 3 stages"),
        (3, {"layers": 4, "boundaries": [2, 2]}, "model.boundaries: must be strictly increasing"),
        (3, {"layers": 4, "boundaries": [3, 1]}, "model.boundaries: must be strictly increasing"),
        (2, {"layers": 3, "boundaries": [3]}, "model.boundaries[0]: must be between 1 and 2"),
        (2, {"layers": 3, "boundaries": [0]}, "model.boundaries[0]: must be between 1 and 2"),
        (4, {"layers": 3}, "stages: 4 stages need as many blocks, but the fcn model"),
        (4, {"name": "cnn", "layers": 2}, "has 3 blocks (conv blocks + classifier head)"),
    ],
)
def test_bad_splits(stages: int, model: dict[str, Any], expected: str) -> None:
    (problem,) = problems_of({"stages": stages, "model": model})
    assert expected in problem


def test_backprop_allows_any_stage_count() -> None:
    cfg = parse_config({"stages": 8, "model": {"layers": 2}, "method": {"name": "backprop"}})
    assert cfg.stages == 8


@pytest.mark.parametrize(
    ("raw", "key", "owner"),
    [
        ({"runtime": {"backend": "ray"}, "method": {"delay": 2}}, "method.delay", "local"),
        ({"runtime": {"backend": "local", "lockstep": True}}, "runtime.lockstep", "ray"),
    ],
)
def test_a_key_of_the_other_backend_is_refused(raw: dict[str, Any], key: str, owner: str) -> None:
    (problem,) = problems_of(raw)
    assert problem.startswith(f"{key}: is read only by runtime.backend={owner}")


def test_keys_of_the_other_backend_at_their_defaults_are_fine() -> None:
    parse_config({"runtime": {"backend": "ray"}, "method": {"delay": 0}})
    parse_config({"runtime": {"backend": "local", "lockstep": False}})
    assert parse_config({}, ["runtime.backend=local", "method.delay=3"]).method.delay == 3
    assert parse_config({}, ["runtime.lockstep=true"]).runtime.lockstep  # ray by default


def test_pipeline_needs_a_micro_batch_per_sample() -> None:
    raw: dict[str, Any] = {
        "method": {"name": "pipeline", "micro_batches": 8},
        "data": {"batch_size": 4},
    }
    assert problems_of(raw) == [
        "data.batch_size: must be >= method.micro_batches (8) for pipeline, got 4"
    ]
    raw["method"]["name"] = "dni"
    assert parse_config(raw).data.batch_size == 4


@pytest.mark.parametrize(
    ("value", "expected"), [("auto", "auto"), (0, 0.0), (0.25, 0.25), ("0.5", 0.5)]
)
def test_gpus_per_stage_accepts(value: Any, expected: float | str) -> None:
    assert parse_config({"runtime": {"gpus_per_stage": value}}).runtime.gpus_per_stage == expected


@pytest.mark.parametrize("value", ["many", -1, -0.5])
def test_gpus_per_stage_rejects(value: Any) -> None:
    (problem,) = problems_of({"runtime": {"gpus_per_stage": value}})
    assert problem.startswith("runtime.gpus_per_stage: must be 'auto' or a number >= 0")


def test_no_cross_check_on_a_field_that_already_failed() -> None:
    # A bad `stages` must not also produce "needs N entries" computed from the default.
    assert problems_of({"stages": "x", "model": {"boundaries": [1, 2]}}) == [
        "stages: expected an integer, got 'x'"
    ]
    assert problems_of({"model": {"layers": 0, "boundaries": [1]}}) == [
        "model.layers: must be >= 1, got 0"
    ]


# --- round trip -------------------------------------------------------------------------------


def sample_config() -> Config:
    return parse_config(
        {
            "seed": 3,
            "stages": 3,
            "data": {"name": "cifar10", "root": "/tmp/d: x", "download": True},
            "model": {"name": "cnn", "layers": 3, "boundaries": [1, 3]},
            "method": {"name": "pipeline", "sg": {"lr": "1e-5"}, "micro_batches": 2},
            "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
            "train": {"steps": 100},
            "runtime": {"address": "ray://head:10001", "gpus_per_stage": 0.5},
            "logging": {"wandb": {"mode": "online", "tags": ["yes", "1e-4"], "group": "g"}},
        }
    )


def test_round_trip_through_dict() -> None:
    cfg = sample_config()
    plain = config_to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert parse_config(plain) == cfg


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = sample_config()
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert path.read_text(encoding="utf-8").startswith("seed: 3\nstages: 3\ndata:\n")


# --- properties -------------------------------------------------------------------------------


def _schema_keys(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for name, value in tree.items():
        key = f"{prefix}{name}"
        yield key
        if isinstance(value, dict):
            yield from _schema_keys(value, key + ".")


SCHEMA_KEYS = sorted(_schema_keys(config_to_dict(Config())))
INTERESTING_STRINGS = [
    *METHODS,
    *("auto", "fcn", "cnn", "adam", "sgd", "digits", "online", "1e-4", "-1", "nan", "inf", ""),
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=12)
    | st.integers()
    | st.floats()
    | st.sampled_from(INTERESTING_STRINGS)
    | st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)
junk_keys = st.lists(st.text(max_size=6), min_size=1, max_size=3).map(".".join)
keys = st.sampled_from(SCHEMA_KEYS) | junk_keys


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    *sections, last = key.split(".")
    node = raw
    for name in sections:
        child = node.get(name)
        if not isinstance(child, dict):
            child = node[name] = {}
        node = child
    node[last] = value


@settings(max_examples=300, deadline=None, database=None)
@given(
    edits=st.lists(st.tuples(keys, values), max_size=5),
    override_edits=st.lists(st.tuples(keys, values), max_size=3),
    junk_overrides=st.lists(st.text(max_size=12), max_size=2),
)
def test_random_edits_parse_or_raise_config_error(
    edits: list[tuple[str, Any]],
    override_edits: list[tuple[str, Any]],
    junk_overrides: list[str],
) -> None:
    raw: dict[str, Any] = {}
    for key, value in edits:
        _set(raw, key, value)
    overrides = [
        f"{key}={yaml.safe_dump(value, default_flow_style=True, width=1_000_000)}"
        for key, value in override_edits
    ] + junk_overrides
    try:
        cfg = parse_config(raw, overrides)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
        return
    plain = config_to_dict(cfg)
    assert parse_config(plain) == cfg
    assert parse_config(yaml.safe_load(yaml.safe_dump(plain, sort_keys=False))) == cfg


YAML_FRAGMENTS = [
    "optim:",
    "  lr: 1e-4",
    "  lrr: 3",
    "stages: 3",
    "model: {boundaries: [1, 2]}",
    "model: {boundaries: [1, 2",
    "- x",
    "data: {root: 2024-13-45}",
    "a: &a [*a]",
    "x: !!python/object:os.system y",
    "  : :",
    "'unterminated",
    "\t",
    "method:\n  name: pipeline\n  micro_batches: 9",
    "seed: 0x1F",
    "runtime: {gpus_per_stage: .inf}",
]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=200, deadline=None, database=None)
@given(
    text=st.lists(st.sampled_from(YAML_FRAGMENTS), max_size=6).map("\n".join) | st.text(max_size=40)
)
def test_any_file_loads_or_raises_config_error(fuzz_dir: Path, text: str) -> None:
    path = fuzz_dir / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as err:
        assert err.problems


@pytest.mark.parametrize(
    ("method", "stages", "delay", "need"),
    [("cdni", 3, 2, 3), ("dni", 4, 1, 2), ("delayed", 3, 2, 5), ("delayed", 4, 3, 10)],
)
def test_a_history_shorter_than_the_in_process_delay_is_refused(
    digits: Dataset, method: str, stages: int, delay: int, need: int
) -> None:
    """The bound is the one measured: at ``need`` no target expires, at ``need - 1`` they do
    (which is why a config asking for it is refused)."""
    common = [
        "data.name=digits",
        "model.layers=4",
        "model.hidden=32",
        "train.progress=false",
        "model.boundaries=even",
        "runtime.backend=local",
        "runtime.gpus_per_stage=0",
        f"method.name={method}",
        f"stages={stages}",
        f"method.delay={delay}",
        "train.steps=30",
    ]
    with pytest.raises(ConfigError, match=rf"method\.sg\.history: .* = {need} kept steps"):
        parse_config({}, [*common, f"method.sg.history={need - 1}"])
    enough = parse_config({}, [*common, f"method.sg.history={need}"])
    short = with_history(enough, need - 1)
    expired = []
    for cfg in (enough, short):
        trainer = LocalTrainer(cfg, digits)
        trainer.run()
        expired.append(sum(s.stage.stats.targets_expired for s in trainer.stages))
    assert expired[0] == 0 and expired[1] > 0
