"""``decoupled plot``: PNG figures from the metrics.jsonl of a real short run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.image import imread

from decoupled.cli import main
from decoupled.plot import load_run
from tests.conftest import DIGITS_CONFIG

PAGES = ["training.png", "stages.png", "synthetic_gradients.png", "dashboard.png"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plot") / "run"
    args = [
        "train",
        str(DIGITS_CONFIG),
        "runtime.backend=local",
        "train.steps=60",
        "train.log_every=5",
        "train.eval_every=20",
        "train.progress=false",
        "method.delay=2",  # late targets: staleness to show
        "--out",
        str(out),
    ]
    assert main(args) == 0
    return out


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    height, width, _ = imread(path).shape
    assert width >= 1000 and height >= 700, (path, width, height)


def test_plot_writes_the_pages_into_run_dir_plots(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run_dir / "plots" / name) for name in PAGES]
    for name in PAGES:
        _check_png(run_dir / "plots" / name)


def test_plot_reads_every_figure_the_run_recorded(run_dir: Path) -> None:
    data = load_run(run_dir)
    assert data.stages == [0, 1, 2]
    assert [r["step"] for r in data.train] == list(range(5, 61, 5))
    assert [r["step"] for r in data.evals] == [20, 40, 60]
    assert data.channel_capacity == 2 and "cdni on digits" in data.title
    last = data.train[-1]
    # 58 targets per synthesizer (the last two steps' are still on their way), all 2 steps late.
    assert last["stage0/staleness_counts"] == last["stage1/staleness_counts"] == {"2": 58}


def test_plot_out_dir_and_a_run_cut_short(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run that crashed mid-write: no summary.json, and half a line at the end.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[:6]
    (crashed / "metrics.jsonl").write_text("\n".join(lines) + '\n{"wall_s": 1.2, "eve')
    shutil.copy(run_dir / "config.yaml", crashed)
    out = tmp_path / "figures"
    assert main(["plot", str(crashed), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(PAGES)
    _check_png(out / "dashboard.png")
    assert load_run(crashed).title == "crashed"
    assert len(load_run(crashed).train) == len([line for line in lines if '"train"' in line])


@pytest.mark.parametrize("content", [None, "", "not json\n"])
def test_plot_without_records_exits_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("decoupled: ") and "metrics.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "plots").exists()


def test_plot_handles_a_stage_figure_missing_from_some_records(tmp_path: Path) -> None:
    # Figures come and go (SG figures only once targets arrive; a restart resets counters):
    # the plots take what is there.
    records = [
        {"event": "train", "wall_s": 1.0, "samples": 64, "train_loss": 2.0,
         "stage0/busy_fraction": 0.5, "stage0/input_wait_s": 0.0},
        {"event": "train", "wall_s": 2.0, "samples": 128, "train_loss": 1.0,
         "stage0/busy_fraction": 0.6, "stage0/sg_cosine": 0.3, "stage1/input_wait_s": 0.4},
        {"event": "restart", "wall_s": 2.5, "samples": 64, "restarts": 1, "reason": "x"},
        {"event": "train", "wall_s": 3.0, "samples": 192, "train_loss": None,
         "stage0/busy_fraction": 0.1, "stage1/input_wait_s": 0.1},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(tmp_path)]) == 0
    for name in PAGES:
        _check_png(tmp_path / "plots" / name)
