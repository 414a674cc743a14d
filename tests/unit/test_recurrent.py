"""Recurrent DNI (decoupled/recurrent/): the segment algorithm against autograd on the whole
sequence, the tasks, the trainer and its configuration."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from decoupled.cli import main
from decoupled.config import Config, ConfigError, parse_config
from decoupled.data import DataError
from decoupled.recurrent import text
from decoupled.recurrent.model import LSTMCore, flatten_state, unflatten_state
from decoupled.recurrent.tasks import CopyTask, Curriculum
from decoupled.recurrent.tbptt import TBPTTLearner, sequence_loss
from decoupled.recurrent.trainer import held_out_bpc, run_recurrent
from decoupled.synthesizer import MLPSynthesizer

ROOT = Path(__file__).resolve().parents[2]
INPUTS, OUTPUTS, HIDDEN, LAYERS, BATCH = 5, 4, 6, 2, 3


def _core(seed: int = 0) -> LSTMCore:
    torch.manual_seed(seed)
    return LSTMCore(INPUTS, OUTPUTS, HIDDEN, LAYERS).double()


def _sequence(steps: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, BATCH, INPUTS, generator=g, dtype=torch.float64)
    y = torch.randint(0, OUTPUTS, (steps, BATCH), generator=g)
    mask = torch.rand(steps, BATCH, generator=g) < 0.7
    return x, y, mask


def _segments(steps: int, bptt: int) -> list[slice]:
    return [slice(s, min(s + bptt, steps)) for s in range(0, steps, bptt)]


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()
    ]


def test_state_flattening_round_trips() -> None:
    core = _core()
    h, c = (torch.randn(LAYERS, BATCH, HIDDEN) for _ in range(2))
    flat = flatten_state((h, c))
    assert flat.shape == (BATCH, core.state_size)
    h2, c2 = unflatten_state(flat, LAYERS)
    assert torch.equal(h, h2) and torch.equal(c, c2)


@pytest.mark.parametrize("bptt", [2, 3])
def test_exact_future_gradient_gives_the_full_bptt_update(bptt: int) -> None:
    steps = 8
    x, y, mask = _sequence(steps)
    parts = _segments(steps, bptt)

    # Full BPTT, segment by segment with the graph kept whole, so the state at every boundary
    # is at hand for the exact gradient of all later losses w.r.t. it.
    full = _core()
    state = full.initial_state(BATCH)
    state = (state[0].double(), state[1].double())
    losses, boundaries = [], []
    for s in parts:
        logits, _, state = full(x[s], state)
        losses.append(sequence_loss(logits, y[s], mask[s]))
        boundaries.append(state)
    future = []
    for k in range(len(parts) - 1):
        later = sum(losses[k + 1 :], torch.zeros((), dtype=torch.float64))
        grads = torch.autograd.grad(later, boundaries[k], retain_graph=True)
        future.append(flatten_state((grads[0], grads[1])))
    torch.autograd.backward(torch.stack(losses).sum())
    expected = _grads(full)

    core = _core()
    learner = TBPTTLearner(core, optimizer=None)
    learner.state = tuple(t.double() for t in core.initial_state(BATCH))  # type: ignore[assignment]
    for k, s in enumerate(parts):
        last = k == len(parts) - 1
        learner.segment(
            x[s], y[s], mask[s], last=last, update=False, future_grad=None if last else future[k]
        )
    got = _grads(core)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    # The same gradient is the same update: one SGD step on each lands on the same parameters.
    for module in (full, core):
        torch.optim.SGD(module.parameters(), lr=0.1).step()
    for a, b in zip(core.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    # And plain tBPTT does not reach it: the future gradient mattered.
    plain = _core()
    tbptt = TBPTTLearner(plain, optimizer=None)
    tbptt.state = tuple(t.double() for t in plain.initial_state(BATCH))  # type: ignore[assignment]
    for k, s in enumerate(parts):
        tbptt.segment(x[s], y[s], mask[s], last=k == len(parts) - 1, update=False)
    assert not torch.allclose(_grads(plain)[0], expected[0])


def _train(synthesizer: bool, episodes: int = 3) -> LSTMCore:
    task = CopyTask(alphabet=3)
    torch.manual_seed(0)
    core = LSTMCore(task.inputs, task.outputs, 8, 1)
    synth = sg_opt = None
    if synthesizer:
        synth = MLPSynthesizer((core.state_size,), None, hidden_layers=1, hidden=8)
        sg_opt = torch.optim.SGD(synth.parameters(), lr=0.0)  # it stays a zero synthesizer
    learner = TBPTTLearner(core, torch.optim.Adam(core.parameters(), lr=1e-2), synth, sg_opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(episodes):
        ep = task.episode(4, 5, g)
        learner.reset(5)
        parts = _segments(ep.x.shape[0], 3)
        for k, s in enumerate(parts):
            learner.segment(ep.x[s], ep.y[s], ep.mask[s], last=k == len(parts) - 1)
    return core


def test_zero_synthesizer_is_exactly_tbptt() -> None:
    dni, plain = _train(synthesizer=True), _train(synthesizer=False)
    for a, b in zip(dni.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(iter(plain.parameters())), next(iter(_core().parameters())))


def test_bootstrapped_target_is_the_next_segments_gradient_plus_the_next_synthetic_one() -> None:
    x, y, mask = _sequence(6)
    core = _core()
    torch.manual_seed(3)
    synth = MLPSynthesizer((core.state_size,), None, hidden_layers=0, hidden=1).double()
    torch.nn.init.normal_(synth.output_layer.weight, std=0.5)  # a synthesizer that says something
    scale = 0.7
    learner = TBPTTLearner(
        core, None, synth, torch.optim.SGD(synth.parameters(), lr=0.1), sg_scale=scale
    )
    learner.state = tuple(t.double() for t in core.initial_state(BATCH))  # type: ignore[assignment]
    learner.segment(x[:2], y[:2], mask[:2], update=False)

    # By hand, before the learner's second segment trains the synthesizer.
    h1, c1 = (t.clone().requires_grad_(True) for t in learner.state)  # type: ignore[union-attr]
    logits, _, s2 = core(x[2:4], (h1, c1))
    own = sequence_loss(logits, y[2:4], mask[2:4])
    flat2 = flatten_state(s2)
    synthetic = scale * synth(flat2.detach()).detach() / BATCH
    through = torch.autograd.grad(own, (h1, c1), retain_graph=True)
    jvp = torch.autograd.grad((flat2 * synthetic).sum(), (h1, c1))
    true_part = flatten_state((through[0], through[1])) * BATCH
    synthetic_part = flatten_state((jvp[0], jvp[1])) * BATCH
    assert synthetic_part.abs().max() > 1e-3  # the bootstrap term is really there
    before = synth.output_layer.weight.clone()

    stats = learner.segment(x[2:4], y[2:4], mask[2:4], update=False)
    assert learner.last_target is not None
    torch.testing.assert_close(learner.last_target, true_part + synthetic_part)
    # The synthesizer was trained on it (the first boundary's state had no target before).
    assert stats.sg_loss is not None and not torch.equal(before, synth.output_layer.weight)


def test_the_last_segment_adds_no_synthetic_gradient() -> None:
    x, y, mask = _sequence(4)
    core, other = _core(), _core()
    synth = MLPSynthesizer((core.state_size,), None, hidden_layers=0, hidden=1).double()
    torch.nn.init.normal_(synth.output_layer.weight)
    with_sg = TBPTTLearner(core, None, synth, torch.optim.SGD(synth.parameters(), lr=0.0))
    without = TBPTTLearner(other, None)
    for learner, module in ((with_sg, core), (without, other)):
        learner.state = tuple(t.double() for t in module.initial_state(BATCH))  # type: ignore[assignment]
        learner.segment(x, y, mask, last=True, update=False)
    for a, b in zip(_grads(core), _grads(other), strict=True):
        assert torch.equal(a, b)


def test_copy_episode_layout() -> None:
    task = CopyTask(alphabet=4)
    ep = task.episode(3, 2, torch.Generator().manual_seed(0))
    assert ep.x.shape == (8, 2, task.inputs) and ep.y.shape == ep.mask.shape == (8, 2)
    chars = ep.x[:3].argmax(-1)
    assert torch.equal(ep.y[4:7], chars) and (ep.y[7] == task.stop).all()
    assert not ep.mask[:4].any() and ep.mask[4:].all()
    assert (ep.x[3].argmax(-1) == 4).all() and (ep.x[4:].argmax(-1) == task.blank).all()


def test_repeat_copy_writes_the_characters_r_times() -> None:
    task = CopyTask(alphabet=4, repeats=3)
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(20):
        ep = task.episode(2, 2, g)
        times = (ep.x.shape[0] - 2 - 1) // 2
        seen.add(times)
        assert int(ep.x[2, 0].argmax()) == 4 + times - 1  # the marker says R
        assert torch.equal(ep.y[3 : 3 + 2 * times], ep.x[:2].argmax(-1).repeat(times, 1))
    assert seen == {1, 2, 3}


def test_curriculum_raises_the_length_below_the_threshold() -> None:
    cur = Curriculum(start=1, threshold_bits=0.5, window=2, max_length=3)
    ln2 = 0.6931471805599453
    assert not cur.record(1.0 * ln2, 1) and not cur.record(0.0, 1)  # window mean 0.5: not below
    assert cur.record(0.0, 1) and cur.length == 2 and cur.solved == 1
    assert not cur.record(0.0, 4) and cur.record(0.1 * ln2, 1) and cur.solved == 2
    cur.record(0.0, 1), cur.record(0.0, 1)
    assert cur.solved == 3 and cur.length == 3  # capped at max_length


def _cfg(*overrides: str) -> Config:
    raw = {
        "stages": 1,
        "data": {"name": "copy", "batch_size": 8},
        "model": {"name": "lstm", "hidden": 16, "layers": 1, "bptt": 2},
        "method": {"name": "dni", "sg": {"layers": 0}},
        "train": {"steps": 20, "log_every": 5, "progress": False},
        "runtime": {"backend": "local"},
    }
    return parse_config(raw, overrides)


def test_config_refuses_what_the_recurrent_model_cannot_do() -> None:
    with pytest.raises(ConfigError) as err:
        _cfg("runtime.backend=ray", "method.name=cdni")
    text_ = str(err.value)
    assert "runtime.backend: model.name=lstm with stages=1 runs with runtime.backend=local" in text_
    assert "method.name: model.name=lstm supports backprop" in text_
    with pytest.raises(ConfigError, match=r"stages: model\.name=lstm runs as one stage"):
        _cfg("stages=3")
    with pytest.raises(ConfigError, match=r"data\.name: model\.name=lstm with stages=2"):
        _cfg("stages=2")  # two cores run lag_copy, not copy
    with pytest.raises(ConfigError, match=r"data.name: 'copy' is a sequence task"):
        _cfg("model.name=fcn")
    with pytest.raises(ConfigError, match=r"data\.name: model\.name=lstm needs one of"):
        _cfg("data.name=digits")
    with pytest.raises(ConfigError, match=r"model\.bptt: must be >= 1"):
        _cfg("model.bptt=0")
    with pytest.raises(ConfigError, match=r"train\.steps: data\.name=copy has no epochs"):
        _cfg("train.steps=null")


def test_cli_refuses_a_recurrent_config_on_ray(capsys: pytest.CaptureFixture[str]) -> None:
    config = ROOT / "configs" / "copy_dni.yaml"
    assert main(["train", str(config), "runtime.backend=ray"]) == 2
    assert "runtime.backend=local only" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["copy_dni.yaml", "copy_repeat_dni.yaml"])
def test_cli_trains_a_copy_config(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train.steps=6", "train.log_every=3", "train.progress=false", "model.hidden=16"]
    assert main(["train", str(ROOT / "configs" / config), *args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dni" and summary["steps"] == 6 and summary["bptt"] == 3
    assert summary["longest_solved"] >= 0 and summary["final_length"] >= 1
    assert summary["stages"][0]["sg_loss"] is not None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert "longest length solved" in capsys.readouterr().out


SAMPLE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity. "
) * 20


def test_charlm_reports_held_out_bits_per_character(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE)
    cfg = _cfg(
        "data.name=charlm",
        f"data.root={corpus}",
        "model.hidden=32",
        "model.bptt=4",
        "train.steps=60",
        "optim.lr=0.01",
        "recurrent.eval_chars=200",
    )
    summary = run_recurrent(cfg, tmp_path)
    assert summary["test_bpc"] is not None and summary["test_bpc"] < 4.0  # uniform over 128: 7
    torch.manual_seed(0)
    untrained = held_out_bpc(LSTMCore(text.VOCAB, text.VOCAB, 8, 1), text.encode(SAMPLE[:300]))
    assert 6.5 < untrained < 7.5


def test_fortune_files_are_read_without_separators_and_index_files(tmp_path: Path) -> None:
    folder = tmp_path / text.FORTUNE_DIR
    folder.mkdir(parents=True)
    (folder / "wisdom").write_text("A stitch in time.\n%\nSaves nine.\n%\n")
    (folder / "wisdom.dat").write_bytes(b"\x00\x01binary")
    assert text.load_corpus(tmp_path) == "A stitch in time.\n\nSaves nine."
    with pytest.raises(DataError, match=r"make charlm-data"):
        text.load_corpus(tmp_path / "elsewhere")


def test_text_streams_are_contiguous_columns() -> None:
    codes = text.encode("abcdefghij")
    assert text.streams(codes, 2)[:, 1].tolist() == list(b"fghij")
    assert copy.copy(text.encode("é")).tolist() == [ord("?")]


def test_auxiliary_task_trains_the_core_but_leaves_the_target_alone() -> None:
    x, y, mask = _sequence(6)
    targets, grads = [], []
    for aux_weight in (0.0, 1.0):
        core = _core()
        torch.manual_seed(3)
        synth = MLPSynthesizer((core.state_size,), None, hidden_layers=0, hidden=1).double()
        torch.nn.init.normal_(synth.output_layer.weight, std=0.5)
        head = torch.nn.Linear(HIDDEN, core.state_size).double()
        learner = TBPTTLearner(
            core,
            None,
            synth,
            torch.optim.SGD(synth.parameters(), lr=0.0),
            aux_head=head if aux_weight else None,
            aux_weight=aux_weight,
        )
        learner.state = tuple(t.double() for t in core.initial_state(BATCH))  # type: ignore[assignment]
        learner.segment(x[:3], y[:3], mask[:3], update=False)
        stats = learner.segment(x[3:], y[3:], mask[3:], update=False)
        assert (stats.aux_loss is not None) == bool(aux_weight)
        assert learner.last_target is not None
        targets.append(learner.last_target)
        grads.append(_grads(core))
    torch.testing.assert_close(targets[0], targets[1], rtol=0, atol=0)
    assert not torch.allclose(grads[0][0], grads[1][0])
