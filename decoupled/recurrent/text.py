"""A character-level corpus: ASCII text as class indices, split into train and held-out text,
and the parallel streams that truncated BPTT walks through.

The corpus a fresh machine can get from a package registry: the English fortune-cookie files of
Debian's ``fortunes`` and ``fortunes-min`` packages (about 2.5 MB of quotations, verse and prose).
``make charlm-data`` (or ``data.download=true``) fetches them with ``apt-get download``, which
needs no root, and unpacks them into ``DATA_ROOT/fortunes``. ``data.root`` may also name any
plain-text file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

from decoupled.data import DataError

VOCAB = 128  # ASCII; anything else is read as '?'
HELD_OUT = 0.1  # the corpus's last tenth is the held-out text
PACKAGES = ("fortunes", "fortunes-min")
FORTUNE_DIR = Path("fortunes") / "usr" / "share" / "games" / "fortunes"


def encode(text: str) -> torch.Tensor:
    """ASCII codes (N,) int64; other characters become '?'."""
    data = text.encode("ascii", errors="replace")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def fortune_text(folder: Path) -> str:
    """The fortune files of ``folder`` in name order, cookies separated by blank lines rather
    than '%' lines; index files (``.dat``), links and offensive/translated subfolders left out."""
    parts = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.is_symlink() and not path.suffix:
            cookies = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
            parts.append("\n\n".join(c.strip("\n") for c in cookies if c.strip()))
    if not parts:
        raise DataError(f"{folder}: no fortune files in it")
    return "\n\n".join(parts)


def load_corpus(root: str | Path, download: bool = False) -> str:
    """The corpus text: ``root`` itself when it is a file, else the fortune files under it."""
    root = Path(root)
    if root.is_file():
        return root.read_text(encoding="utf-8", errors="replace")
    folder = root / FORTUNE_DIR
    if not folder.is_dir() and download:
        fetch_fortunes(root)
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no corpus for data.name=charlm; run `make charlm-data DATA_ROOT={root}` "
            "(or set data.download=true, or data.root to a plain-text file)"
        )
    return fortune_text(folder)


def fetch_fortunes(root: Path) -> None:
    """``apt-get download`` the fortune packages into ``root/fortunes`` and unpack them there."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError("data.download for charlm needs apt-get and dpkg-deb (a Debian system)")
    dest = root / "fortunes"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=dest, check=True, timeout=300)
        for deb in sorted(dest.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb.name, "."], cwd=dest, check=True, timeout=300)
    except (subprocess.SubprocessError, OSError) as err:
        raise DataError(f"{dest}: downloading {', '.join(PACKAGES)} failed: {err}") from None


def split(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the first 90% and the last 10% of the characters."""
    if codes.numel() < 100:
        raise DataError(f"the corpus has {codes.numel()} characters; it needs at least 100")
    cut = int(codes.numel() * (1 - HELD_OUT))
    return codes[:cut], codes[cut:]


def streams(codes: torch.Tensor, batch: int) -> torch.Tensor:
    """(L, B): the text cut into ``batch`` contiguous streams, one per column."""
    length = codes.numel() // batch
    if length < 2:
        raise DataError(f"{codes.numel()} characters cannot fill {batch} streams")
    return codes[: batch * length].view(batch, length).t().contiguous()


def windows(codes: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text cut into non-overlapping windows of ``context`` characters, for the gpt model:
    x (N, T) and, per position, the character after it, y (N, T) (x shifted by one)."""
    count = (codes.numel() - 1) // context
    if count < 1:
        raise DataError(
            f"{codes.numel()} characters cannot fill one window of model.context={context} "
            "characters and its next-character labels"
        )
    end = count * context
    return codes[:end].view(count, context), codes[1 : end + 1].view(count, context)
