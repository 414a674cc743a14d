"""W&B without Ray: a server that cannot be reached or answers errors never stops training;
the run file of an offline run holds what the run logged. The only stand-in is the W&B server.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from decoupled.cli import main
from decoupled.metrics import RunLog
from decoupled.wandb_logger import WARNING_PREFIX, histogram_arrays, staleness_window
from tests.conftest import DIGITS_CONFIG, small_config
from tests.wandb_records import read_run, run_file

SHORT = [
    "runtime.backend=local",
    "train.steps=24",
    "train.log_every=4",
    "train.eval_every=12",
    "train.progress=false",
    "method.delay=2",  # targets two steps late: a staleness distribution worth logging
]
FAKE_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, like a real key


def _train(out: Path, *overrides: str) -> int:
    return main(["train", str(DIGITS_CONFIG), *SHORT, *overrides, "--out", str(out)])


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(WARNING_PREFIX)]


def _assert_local_logs_complete(out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["test_accuracy"] is not None
    assert "wandb" not in summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [4, 8, 12, 16, 20, 24]
    assert sum(r["event"] == "eval" for r in records) == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Failing(BaseHTTPRequestHandler):
    """A W&B server having a bad day: every request is a 500."""

    def _fail(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _fail

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def failing_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("server", ["unreachable", "server error"])
def test_a_w_and_b_server_that_fails_warns_once_and_training_completes(
    wandb_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    server: str,
) -> None:
    if server == "unreachable":
        url = f"http://127.0.0.1:{_closed_port()}"
    else:
        url = request.getfixturevalue("failing_server")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "4")  # how long wandb.init may try
    out = tmp_path / "run"
    assert _train(out, "logging.wandb.mode=online") == 0
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert "local logs keep everything" in warnings[0]
    _assert_local_logs_complete(out)


def test_online_without_a_key_in_the_environment_warns_and_trains(
    wandb_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(out, "logging.wandb.mode=online") == 0
    (warning,) = _warnings(capsys.readouterr().err)
    assert "WANDB_API_KEY" in warning
    _assert_local_logs_complete(out)
    assert not (out / "wandb").exists()


def test_disabled_writes_no_w_and_b_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert _train(out) == 0  # logging.wandb.mode defaults to disabled
    assert not _warnings(capsys.readouterr().err)
    assert not (out / "wandb").exists()
    _assert_local_logs_complete(out)


def test_offline_run_file_holds_records_and_summary_of_the_local_trainer(
    wandb_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    tags = "logging.wandb.tags=[paper]"
    assert _train(out, "logging.wandb.mode=offline", "logging.wandb.group=g1", tags) == 0
    summary = json.loads((out / "summary.json").read_text())
    run = read_run(run_file(out / "wandb"))
    assert summary["wandb"]["dir"] == str(run_file(out / "wandb").parent)
    assert "W&B run:" in capsys.readouterr().out
    assert run.run.run_group == "g1" and list(run.run.tags) == [
        "cdni",
        "3-stages",
        "digits",
        "paper",
    ]
    assert run.config["method"]["delay"] == 2 and run.config["runtime"]["backend"] == "local"
    train = [row for row in run.history if "train_loss" in row]
    assert [row["samples"] for row in train] == [4 * 64 * i for i in range(1, 7)]
    # Targets arrive two steps late: every SG update of stages 0 and 1 has staleness 2, and the
    # first window of 4 steps gets only two of them.
    for stage in (0, 1):
        windows = []
        for row in train:
            hist = row[f"stage{stage}/staleness"]
            assert hist["_type"] == "histogram"
            centres = [(a + b) / 2 for a, b in itertools.pairwise(hist["bins"])]
            windows.append(dict(zip(centres, hist["values"], strict=True)))
        assert windows == [{2.0: 2}] + [{2.0: 4}] * 5
    assert "stage2/staleness" not in train[-1]  # the last stage has no synthesizer
    assert run.summary["test_accuracy"] == summary["test_accuracy"]
    assert run.summary["stage0/sg_updates"] == summary["stages"][0]["sg_updates"] == 22
    assert run.summary["stage0/staleness"]["values"] == [22]
    assert run.exit_code == 0


def test_staleness_windows_and_histogram_bins() -> None:
    total, window = staleness_window({"1": 3, "2": 5}, None)
    assert total == {1: 3, 2: 5} and window == {1: 3, 2: 5}
    total, window = staleness_window({"1": 3, "2": 9, "4": 1}, total)
    assert window == {2: 4, 4: 1}  # only what arrived since the previous poll
    counts, edges = histogram_arrays(window)
    assert counts.tolist() == [4, 0, 1] and edges.tolist() == [1.5, 2.5, 3.5, 4.5]
    counts, edges = histogram_arrays({0: 1, 500: 1})  # a long tail: at most 64 bins
    assert len(counts) == 64 and counts.sum() == 2


def test_a_run_that_fails_ends_its_w_and_b_run_as_failed(wandb_home: Path, tmp_path: Path) -> None:
    cfg = small_config(["logging.wandb.mode=offline"])
    with pytest.raises(RuntimeError, match="stage 1 died"), RunLog(tmp_path, 10, False, cfg) as log:
        log.write({"event": "train", "step": 5, "samples": 320, "train_loss": 1.5})
        raise RuntimeError("stage 1 died")
    run = read_run(run_file(tmp_path))
    assert run.exit_code == 1
    assert [row["train_loss"] for row in run.history if "train_loss" in row] == [1.5]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["train_loss"] == 1.5
