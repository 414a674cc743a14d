"""The GPT on character windows: causality, per-token synthesizers and heads, the text data, and
every chain method training it end to end (the equivalences with backprop: test_stage.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from decoupled.balance import resolve_boundaries
from decoupled.config import ConfigError, DGLConfig, SGConfig
from decoupled.data import Dataset, TrainStream
from decoupled.local import LocalTrainer
from decoupled.methods import METHODS
from decoupled.methods.dgl import auxiliary_head
from decoupled.models import build_stage_modules
from decoupled.recurrent import text
from decoupled.synthesizer import build_synthesizer
from tests.conftest import TEXT, gpt_config

CHAINS = sorted(name for name, method in METHODS.items() if not method.replicas)


def test_a_token_sees_only_the_tokens_before_it(corpus: Path, text_windows: Dataset) -> None:
    """Changing token t + 1 leaves every stage's output at positions <= t as it was, and
    changes it from t + 1 on."""
    cfg = gpt_config(corpus, ["stages=3"])
    modules = build_stage_modules(
        cfg.model, 3, text_windows.input_shape, text_windows.num_classes, cfg.seed
    )
    x = text_windows.train_x[:4]
    changed = x.clone()
    t = 4
    changed[:, t + 1] = (changed[:, t + 1] + 1) % text_windows.num_classes
    h, h_changed = x, changed
    with torch.no_grad():
        for module in modules:
            h, h_changed = module(h), module(h_changed)
            assert h.shape[:2] == x.shape
            torch.testing.assert_close(h[:, : t + 1], h_changed[:, : t + 1], rtol=0, atol=1e-6)
            assert (h[:, t + 1 :] - h_changed[:, t + 1 :]).abs().amax(dim=2).min() > 1e-4
    assert h.shape == (*x.shape, text.VOCAB)  # the last stage gives next-token logits


@pytest.mark.parametrize("conditioned", [False, True])
def test_a_synthesizer_on_a_sequence_predicts_each_token_from_that_token(
    conditioned: bool,
) -> None:
    """On (B, T, D) activations the MLP synthesizer runs per token: its size does not grow with
    T, and a token's prediction moves only with that token's vector and (cDNI) its next-token
    target."""
    batch, length, width, vocab = 3, 10, 16, text.VOCAB
    sg = SGConfig(layers=1, hidden=32)
    labels_for = vocab if conditioned else None
    synthesizer = build_synthesizer((length, width), sg, labels_for)
    longer = build_synthesizer((4 * length, width), sg, labels_for)
    count = sum(p.numel() for p in synthesizer.parameters())
    assert count == sum(p.numel() for p in longer.parameters())
    h = torch.randn(batch, length, width)
    y = torch.randint(0, vocab, (batch, length))
    assert torch.equal(synthesizer(h, y), torch.zeros_like(h))  # zero-initialised: no update
    torch.nn.init.normal_(synthesizer.output_layer.weight)
    out = synthesizer(h, y)
    assert out.shape == h.shape
    h2, y2 = h.clone(), y.clone()
    h2[:, 3] += 1.0
    y2[:, 6] = (y2[:, 6] + 1) % vocab
    moved = (synthesizer(h2, y2) - out).abs().amax(dim=(0, 2)) > 0
    expected = {3, 6} if conditioned else {3}
    assert set(torch.nonzero(moved).flatten().tolist()) == expected
    if conditioned:  # one label per sequence conditions every token alike
        per_sample = synthesizer(h, y[:, 0])
        assert torch.equal(per_sample, synthesizer(h, y[:, :1].expand(-1, length)))


def test_a_dgl_head_gives_next_token_logits_per_token() -> None:
    head = auxiliary_head((10, 16), text.VOCAB, DGLConfig(layers=1, hidden=8))
    h = torch.randn(2, 10, 16)
    out = head(h)
    assert out.shape == (2, 10, text.VOCAB)
    h[:, 7] += 1.0
    moved = (head(h) - out).abs().amax(dim=(0, 2)) > 0
    assert torch.nonzero(moved).flatten().tolist() == [7]


def test_text_windows_are_next_character_pairs_fixed_by_seed_and_step(
    text_windows: Dataset,
) -> None:
    x, y = text_windows.train_x, text_windows.train_y
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == 8
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:-1, -1], x[1:, 0])
    assert bytes(x[0].tolist()).decode() == TEXT[:8]
    assert text_windows.test_x.numel() <= 200  # recurrent.eval_chars
    a = TrainStream(x, y, 8, seed=3)
    b = TrainStream(x, y, 8, seed=3)
    for step in (5, 0, 40):
        assert all(torch.equal(p, q) for p, q in zip(a.batch(step), b.batch(step), strict=True))
    other = TrainStream(x, y, 8, seed=4).batch(5)[0]
    assert not torch.equal(a.batch(5)[0], other)


@pytest.mark.parametrize("method", CHAINS)
def test_every_chain_method_trains_the_gpt_and_reports_bits_per_character(
    corpus: Path, text_windows: Dataset, method: str
) -> None:
    cfg = gpt_config(corpus, [f"method.name={method}", "stages=3", "train.steps=4"])
    summary = LocalTrainer(cfg, text_windows).run()
    assert summary["test_bpc"] == pytest.approx(summary["test_loss"] / math.log(2))
    assert 0 <= summary["test_accuracy"] <= 1
    assert math.isfinite(summary["train_loss"])
    if method in ("dni", "cdni"):
        assert all(s["sg_updates"] > 0 for s in summary["stages"][:-1])


def test_cdni_learns_the_text(corpus: Path, text_windows: Dataset) -> None:
    """Uniform guessing over the 128 characters is 7 bits per character."""
    cfg = gpt_config(corpus, ["method.name=cdni", "stages=2", "train.steps=60", "optim.lr=3e-3"])
    assert LocalTrainer(cfg, text_windows).run()["test_bpc"] < 4.5


def test_auto_boundaries_time_the_gpt_on_token_windows(corpus: Path) -> None:
    cfg = gpt_config(corpus, ["method.name=cdni", "stages=2", "model.boundaries=auto"])
    balance = resolve_boundaries(cfg, (8,), text.VOCAB)
    assert balance.how == "auto" and len(balance.boundaries) == 1
    assert balance.stage_costs_ms is not None and len(balance.stage_costs_ms) == 2


def test_gpt_configuration_errors_name_the_key(corpus: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.heads: must divide model.hidden \(16\)"):
        gpt_config(corpus, ["model.heads=3"])
    with pytest.raises(ConfigError, match=r"data.name: model.name=gpt reads token windows"):
        gpt_config(corpus, ["data.name=digits"])
    with pytest.raises(ConfigError, match=r"data.name: 'charlm' .* needs model.name=lstm or gpt"):
        gpt_config(corpus, ["model.name=fcn"])
