"""Random config edits through the real CLI: a clear exit code, never a traceback."""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoupled.cli import main
from decoupled.config import Config
from tests.conftest import DIGITS_CONFIG


def _keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _keys(typing.cast(type, hint), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


KEYS = _keys(Config)
# Kept last so that every example stays a short, local, offline run.
PINNED = [
    "runtime.backend=local",
    "train.steps=2",
    "train.progress=false",
    "logging.wandb.mode=disabled",
    "data.eval_batch_size=512",
]
values = st.one_of(
    st.integers(-3, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "true",
            "false",
            "null",
            "[]",
            "[1, 2]",
            "auto",
            "cdni",
            "cnn",
            "{a: 1}",
            "'1e-3'",
            "fcn",
            "mnist",
            "x",
            "- 1",
            ":",
            "[",
            "''",
        ]
    ),
)
edits = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(KEYS), st.text("abc._", min_size=1, max_size=8)), values
    ).map(lambda kv: f"{kv[0]}={kv[1]}"),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=edits)
def test_random_config_edits_never_show_a_traceback(
    edits: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A folder per example: a second run into the first one's folder is refused (exit 2), which
    # would hide what the edits do.
    out = tempfile.mkdtemp(dir=tmp_path)
    code = main(["train", str(DIGITS_CONFIG), *edits, *PINNED, "--out", out])
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (edits, err)
    assert "Traceback" not in err, (edits, err)
    if code != 0:
        assert err.startswith("decoupled: "), (edits, err)
