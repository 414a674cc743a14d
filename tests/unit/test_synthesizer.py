"""Synthesizers: zero at initialisation, shapes, label conditioning, and convergence to a true
gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from decoupled.config import OptimConfig, SGConfig
from decoupled.methods.dni import SynthesizerStage
from decoupled.optim import StageOptimizer
from decoupled.stage import Stage
from decoupled.synthesizer import ConvSynthesizer, MLPSynthesizer, build_synthesizer

OPTIM = OptimConfig()


def test_zero_initialised_output_and_shapes() -> None:
    torch.manual_seed(0)
    for shape, kind in (((32,), MLPSynthesizer), ((8, 6, 6), ConvSynthesizer)):
        for classes in (None, 10):
            sg = build_synthesizer(shape, SGConfig(layers=2, hidden=16), classes)
            assert isinstance(sg, kind)
            h = torch.randn(5, *shape)
            out = sg(h, torch.arange(5))
            assert out.shape == h.shape
            assert torch.count_nonzero(out) == 0


def test_without_zero_start_the_output_bias_and_a_label_bias_keep_their_default_init() -> None:
    """``method.sg.zero_start=false``, the peer's init: the output weights still start at zero,
    so the first prediction is a constant per label: the output bias (at nn.Linear's default,
    U(±1/sqrt(fan_in))) plus the label projection's bias, pushed through the hidden layers."""
    torch.manual_seed(0)
    for shape, classes in (((32,), None), ((32,), 10), ((8, 6, 6), 10)):
        sg = build_synthesizer(shape, SGConfig(layers=1, hidden=16, zero_start=False), classes)
        out_layer = sg.output_layer
        assert out_layer.bias is not None and torch.count_nonzero(out_layer.weight) == 0
        fan_in = out_layer.weight[0].numel()
        assert 0 < out_layer.bias.abs().max() <= 1 / fan_in**0.5
        x = torch.randn(6, *shape)
        out = sg(x, torch.zeros(6, dtype=torch.long))
        # the same for every sample: the output weights are zero
        assert torch.equal(out, out_layer.bias.view(1, -1, *[1] * (len(shape) - 1)).expand_as(out))
        if classes is None:
            assert sg.label_bias is None
        else:
            assert sg.label_bias is not None and sg.label_bias.requires_grad
            assert 0 < sg.label_bias.abs().max() <= 1 / classes**0.5
            assert any(p is sg.label_bias for p in sg.parameters())  # trained with the rest
    zero = build_synthesizer((32,), SGConfig(layers=1, hidden=16), 10)
    assert zero.label_bias is None and zero.output_layer.bias is not None
    assert torch.count_nonzero(zero.output_layer.bias) == 0


def _fit_quadratic(conditioned: bool, steps: int = 1500) -> float:
    """Fit an SG through its stage's backward event to the true gradient of
    L(h) = 1/2 ||A h - c_y||^2 (per sample), i.e. g = A^T (A h - c_y), which is linear in h
    and in the one-hot label: a label-conditioned linear SG can represent it exactly.
    Returns the final SG/target cosine on fresh batches."""
    torch.manual_seed(0)
    dim, classes = 16, 4
    a = torch.randn(dim, dim) / dim**0.5
    centres = torch.randn(classes, dim) * 3
    module = nn.Linear(dim, dim)
    sg = MLPSynthesizer((dim,), classes if conditioned else None, hidden_layers=0, hidden=1)
    stage = SynthesizerStage(
        # A frozen stage (lr 0): the data the synthesizer sees stays fixed.
        Stage(0, 2, module, StageOptimizer(torch.optim.SGD(module.parameters(), lr=0.0), OPTIM)),
        sg,
        torch.optim.Adam(sg.parameters(), lr=1e-2),
        history=4,
    )
    for seq in range(steps):
        x, y = torch.randn(64, dim), torch.randint(0, classes, (64,))
        h = stage.forward(seq, x, y).forward
        assert h is not None
        stage.backward(seq, (h @ a.T - centres[y]) @ a)
    return sum(list(stage.stats.recent_cosine)[-20:]) / 20


def test_conditioned_sg_converges_to_true_gradient() -> None:
    assert _fit_quadratic(conditioned=True) > 0.99


def test_unconditioned_sg_cannot_see_the_label_term() -> None:
    # The same problem without labels: the c_y term is invisible, so the fit is clearly worse.
    # This guards the conditioning itself (a cDNI synthesizer that ignored labels would pass
    # the test above only by luck).
    assert _fit_quadratic(conditioned=False) < 0.95


def test_conv_sg_converges_on_a_linear_problem() -> None:
    torch.manual_seed(0)
    sg = ConvSynthesizer((2, 5, 5), None, hidden_layers=0, hidden=1)
    opt = torch.optim.Adam(sg.parameters(), lr=1e-2)
    kernel = torch.randn(2, 2, 3, 3)
    for _ in range(800):
        h = torch.randn(32, 2, 5, 5)
        loss = F.mse_loss(sg(h), F.conv2d(h, kernel, padding=1))
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
    h = torch.randn(32, 2, 5, 5)
    with torch.no_grad():
        cos = F.cosine_similarity(sg(h).flatten(), F.conv2d(h, kernel, padding=1).flatten(), dim=0)
    assert cos > 0.99


def _fit_label_target(shape: tuple[int, ...], conditioned: bool, hidden: int, steps: int) -> float:
    """Fit a one-hidden-layer synthesizer (Adam 3e-4, batch 64: the 4-layer setting of issue
    13) to a target that depends on the label alone, g = c_y (per channel, the same at every
    position of a feature map); the cosine on a fresh batch.

    Non-negative inputs, as after a ReLU; targets of scale 0.1."""
    torch.manual_seed(0)
    classes = 10
    per_channel = torch.randn(classes, shape[0]) * 0.1
    centres = per_channel.view(classes, shape[0], *[1] * (len(shape) - 1)).expand(classes, *shape)
    sg = build_synthesizer(
        shape, SGConfig(layers=1, hidden=hidden), classes if conditioned else None
    )
    opt = torch.optim.Adam(sg.parameters(), lr=3e-4)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(torch.randn(64, *shape)), torch.randint(0, classes, (64,))

    for _ in range(steps):
        h, y = batch()
        loss = F.mse_loss(sg(h, y), centres[y])
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
    h, y = batch()
    with torch.no_grad():
        return float(F.cosine_similarity(sg(h, y).flatten(), centres[y].flatten(), dim=0))


def test_label_conditions_the_mlp_synthesizer_from_the_start() -> None:
    # 256 features and a 1024-unit hidden layer, as after each hidden layer of the 4-layer FCN.
    # The label enters through an embedding of its own; appended to the 256 activations, its
    # weights started ~5x smaller and the same 50 steps reached a cosine of only ~0.5.
    assert _fit_label_target((256,), conditioned=True, hidden=1024, steps=50) > 0.95
    assert _fit_label_target((256,), conditioned=False, hidden=1024, steps=50) < 0.5


def test_label_conditions_the_conv_synthesizer_from_the_start() -> None:
    # Label planes stacked onto 64 channels reached a cosine of ~0.84 in these 30 steps.
    assert _fit_label_target((64, 4, 4), conditioned=True, hidden=64, steps=30) > 0.95
    assert _fit_label_target((64, 4, 4), conditioned=False, hidden=64, steps=30) < 0.5


def test_linear_conditioned_synthesizer_starts_at_zero() -> None:
    # With no hidden layer the label term is part of the output layer: it starts at zero too.
    for shape in ((32,), (4, 5, 5)):
        sg = build_synthesizer(shape, SGConfig(layers=0), 10)
        assert sg.label is not None
        assert torch.count_nonzero(sg.label.weight) == 0
        assert torch.count_nonzero(sg(torch.randn(3, *shape), torch.arange(3))) == 0
