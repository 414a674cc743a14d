"""Read a W&B run file (``run-<id>.wandb``) back: what an offline run would upload.

The file is a LevelDB-style log (a 7-byte header ``:W&B``, magic 0xBEE1, version 0, then 32 KiB
blocks of records, each with a CRC-32 seeded by its type, a length and a type: full, or first/
middle/last pieces of a record split across blocks) of ``wandb_internal_pb2.Record`` messages.
wandb 0.31 writes it from its Go core and no longer ships the Python reader
(``wandb.sdk.internal.datastore``), so the tests carry this small one.
"""

from __future__ import annotations

import importlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Generated protobuf code without type stubs: typed as Any.
pb: Any = importlib.import_module("wandb.proto.wandb_internal_pb2")

_HEADER = struct.Struct("<4sHB")
_RECORD = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_SEED = {kind: zlib.crc32(bytes([kind])) for kind in (_FULL, _FIRST, _MIDDLE, _LAST)}


def read_records(path: Path) -> list[Any]:
    raw = path.read_bytes()
    ident, magic, version = _HEADER.unpack_from(raw)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B run file"
    records: list[Any] = []
    offset, pending = _HEADER.size, b""
    while offset < len(raw):
        left = _BLOCK - offset % _BLOCK
        if left < _RECORD.size:  # the rest of a block too small for a header is padding
            offset += left
            continue
        checksum, length, kind = _RECORD.unpack_from(raw, offset)
        offset += _RECORD.size
        data = raw[offset : offset + length]
        offset += length
        assert zlib.crc32(data, _SEED[kind]) == checksum, f"{path}: bad checksum at {offset}"
        pending += data
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@dataclass
class WandbRun:
    """The parts of a run file the tests look at, decoded from JSON."""

    run: Any
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[Any] = field(default_factory=list)
    exit_code: int | None = None


def _set(target: dict[str, Any], item: Any) -> None:
    """One ``key`` or ``nested_key`` item (history, summary, config) into a nested dict."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


def read_run(path: Path) -> WandbRun:
    records = read_records(path)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs, f"{path}: no run record"
    out = WandbRun(run=runs[0])
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            for item in record.run.config.update:
                _set(out.config, item)
        elif kind == "config":
            for item in record.config.update:
                _set(out.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item)
            out.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _set(out.summary, item)
        elif kind == "metric":
            out.metrics.append(record.metric)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    return out


def run_file(root: Path) -> Path:
    """The one run file under ``root`` (a run folder or a W&B folder), complete.

    wandb's core process writes the file on its own schedule, and ``run.finish()`` may return
    before the last records (or, on a busy machine, any record) reach it; stopping the core, as
    the end of a process does, flushes them. So this ends the client first."""
    import wandb

    wandb.teardown()
    found = sorted(root.rglob("run-*.wandb"))
    assert len(found) == 1, f"expected one W&B run file under {root}, found {found}"
    return found[0]


def isolate_wandb(home: Path, monkeypatch: Any) -> None:
    """Keep W&B's own files under ``home`` and start every test with a fresh client.

    The wandb client reads its environment once per process (at its first use) and ignores
    changes after that, so it is torn down before and after each test that sets it."""
    import wandb

    wandb.teardown()
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("CACHE", "CONFIG", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(home / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")  # no system-metrics sampler in tests
