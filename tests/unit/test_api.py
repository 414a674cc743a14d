"""The Python API (decoupled.train) and user code named by configs ("module:function")."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import decoupled
from decoupled.cli import main
from decoupled.config import ConfigError
from tests.conftest import DIGITS_CONFIG

SHORT = ["train.steps=20", "train.progress=false", "runtime.backend=local", "stages=2"]
# The figures a run computes (its timings aside): the same config and seed give the same ones.
FIGURES = ("method", "steps", "train_loss", "test_accuracy", "test_loss", "boundaries")

USER_CODE = """
import torch
from torch import nn


def blocks(cfg, input_shape, num_classes):
    width = cfg.hidden
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU()),
        nn.Sequential(nn.Linear(width, width), nn.ReLU()),
        nn.Linear(width, num_classes),
    ]


def mismatched(cfg, input_shape, num_classes):
    return [nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), nn.Linear(17, num_classes)]


def not_blocks(cfg, input_shape, num_classes):
    return "a model"


def one_argument(cfg):
    return []


def blobs(cfg):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 5, generator=g) + 3 * nn.functional.one_hot(y, 5).float()
    return x[:240], y[:240], x[240:], y[240:]
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of the user's, outside the package, importable as ``user_code``."""
    (tmp_path / "user_code.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_code"
    sys.modules.pop("user_code", None)


def test_api_and_cli_give_the_same_run(tmp_path: Path) -> None:
    overrides = [*SHORT, "method.name=cdni", "model.boundaries=even"]
    assert main(["train", str(DIGITS_CONFIG), *overrides, "--out", str(tmp_path / "cli")]) == 0
    returned = decoupled.train(DIGITS_CONFIG, overrides, out=tmp_path / "api")
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    api = json.loads((tmp_path / "api" / "summary.json").read_text())
    for key in FIGURES:
        assert cli[key] == api[key] == returned[key], key
    assert [s["sg_loss"] for s in cli["stages"]] == [s["sg_loss"] for s in api["stages"]]
    assert (tmp_path / "api" / "config.yaml").read_text() == (
        tmp_path / "cli" / "config.yaml"
    ).read_text()


def test_api_takes_a_mapping_and_refuses_a_bad_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; did you mean 'lr'"):
        decoupled.train({"optim": {"lrr": 0.1}}, out=tmp_path / "run")


def test_a_users_model_and_data_train_by_name(user_module: str, tmp_path: Path) -> None:
    summary = decoupled.train(
        {"model": {"name": f"{user_module}:blocks", "hidden": 32}},
        [*SHORT, "method.name=cdni", "train.steps=100"],
        out=tmp_path / "model",
    )
    assert summary["test_accuracy"] > 0.5 and summary["boundaries"]
    summary = decoupled.train(
        {"data": {"name": f"{user_module}:blobs", "batch_size": 40}},
        [*SHORT, "method.name=backprop", "model.layers=2", "optim.lr=0.01", "train.steps=100"],
        out=tmp_path / "data",
    )
    assert summary["dataset"] == f"{user_module}:blobs" and summary["test_accuracy"] > 0.9


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module:blocks", "model.name: cannot import 'no_such_module'"),
        ("user_code:absent", "model.name: 'user_code' has no function 'absent'"),
        ("user_code:one_argument", "model.name: user_code:one_argument must take (model_cfg"),
        ("user_code:not_blocks", "must return a non-empty list of nn.Module blocks, got str"),
        (
            "user_code:mismatched",
            "model.name: block 1 (Linear) cannot take the output of block 0 (Sequential)",
        ),
    ],
)
def test_bad_user_code_exits_2_naming_the_key_and_reason(
    user_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    code = main(
        ["train", str(DIGITS_CONFIG), *SHORT, f"model.name={name}", "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_a_model_name_that_is_neither_builtin_nor_code_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"must be one of: fcn, cnn, resnet, lstm, gpt or .module:function."
    ):
        decoupled.load({"model": {"name": "transformer"}})
