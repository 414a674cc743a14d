"""Random config edits through the real CLI: a clear exit code, never a traceback."""

from __future__ import annotations

import dataclasses
import gzip
import math
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
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


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-fuzz")


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


CAPSYS = [HealthCheck.function_scoped_fixture]  # capsys is read and so emptied each example

# --- the shapes of bad input a user meets at the boundaries -------------------------------------

DIGITS = yaml.safe_load(DIGITS_CONFIG.read_text(encoding="utf-8"))
SECTIONS = sorted(k for k, v in DIGITS.items() if isinstance(v, dict))


def _broken_file(shape: str, section: str, where: float, junk: bytes) -> tuple[bytes, str]:
    """A config file broken in ``shape``; returns its bytes and what the message must name
    (``{path}`` for the file itself)."""
    if shape == "not utf-8":
        text = DIGITS_CONFIG.read_bytes()
        cut = int(where * len(text))
        # 0xff never occurs in UTF-8, whatever follows it.
        return text[:cut] + b"\xff" + junk + text[cut:], "{path}"
    raw = dict(DIGITS)
    if shape == "list at the top":
        return yaml.safe_dump(list(raw.items())).encode(), "{path}"
    raw[section] = list(raw[section].values())  # "list in a section"
    return yaml.safe_dump(raw).encode(), section


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=CAPSYS)
@given(
    shape=st.sampled_from(["not utf-8", "list at the top", "list in a section"]),
    section=st.sampled_from(SECTIONS),
    where=st.floats(0, 1),
    junk=st.binary(max_size=6),
    edits=st.lists(st.sampled_from(["train.steps=2", "method.delay=1", "seed=1"]), max_size=2),
)
def test_broken_config_files_exit_2_naming_the_file_or_key(
    fuzz_dir: Path,
    shape: str,
    section: str,
    where: float,
    junk: bytes,
    edits: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, named = _broken_file(shape, section, where, junk)
    path = fuzz_dir / "broken.yaml"
    path.write_bytes(data)
    out = tempfile.mkdtemp(dir=fuzz_dir)
    code = main(["train", str(path), *edits, "--out", out])
    err = capsys.readouterr().err
    assert code == 2, (shape, err)
    assert "Traceback" not in err and err.startswith("decoupled: ")
    assert named.format(path=path) in err, err


other_backend_keys = st.one_of(
    st.tuples(st.just("method.delay"), st.integers(1, 500).map(str), st.just("local")),
    st.tuples(st.just("runtime.lockstep"), st.sampled_from(["true", "yes", "on"]), st.just("ray")),
)


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=CAPSYS)
@given(edit=other_backend_keys, in_file=st.booleans())
def test_a_key_of_the_other_backend_exits_2_naming_it(
    fuzz_dir: Path, edit: tuple[str, str, str], in_file: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    key, value, owner = edit
    backend = "ray" if owner == "local" else "local"
    config, overrides = DIGITS_CONFIG, [f"{key}={value}", f"runtime.backend={backend}"]
    if in_file:  # the same, written in the experiment file
        raw = yaml.safe_load(DIGITS_CONFIG.read_text(encoding="utf-8"))
        section, name = key.split(".")
        raw[section][name] = yaml.safe_load(value)
        raw["runtime"]["backend"] = backend
        config, overrides = fuzz_dir / "other-backend.yaml", []
        config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out = Path(tempfile.mkdtemp(dir=fuzz_dir)) / "run"
    code = main(["train", str(config), *overrides, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{key}: is read only by runtime.backend={owner}" in err, err
    assert not out.exists()


IDX = {
    "train-images-idx3-ubyte": (12, 28, 28),
    "train-labels-idx1-ubyte": (12,),
    "t10k-images-idx3-ubyte": (5, 28, 28),
    "t10k-labels-idx1-ubyte": (5,),
}


def _idx(dims: tuple[int, ...], body: int) -> bytes:
    """An unsigned-byte IDX file with a right header for ``dims`` and ``body`` bytes of data."""
    header = (0x0800 | len(dims)).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in dims)
    return header + bytes(body)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=CAPSYS)
@given(
    broken=st.sampled_from(sorted(IDX)),
    keep=st.floats(0, 1, exclude_max=True),
    gz=st.booleans(),
)
def test_an_idx_file_with_a_truncated_body_exits_2_naming_it(
    fuzz_dir: Path, broken: str, keep: float, gz: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(tempfile.mkdtemp(dir=fuzz_dir))
    for name, dims in IDX.items():
        size = math.prod(dims)
        data = _idx(dims, int(keep * size) if name == broken else size)
        path = root / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
    dataset = ["data.name=mnist", f"data.root={root}"]
    code = main(["train", str(DIGITS_CONFIG), *dataset, *PINNED, "--out", str(root / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{root / broken}" in err and "bytes of data" in err, err
