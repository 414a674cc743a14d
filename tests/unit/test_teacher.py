"""The generated teacher task: deterministic, balanced, tunable, and learnable."""

from __future__ import annotations

import pytest
import torch

from decoupled.config import ConfigError, DataConfig, TeacherConfig, parse_config
from decoupled.data import load_dataset
from decoupled.teacher import Teacher, generate_teacher

SMALL = TeacherConfig(train_samples=3000, test_samples=1000, input_dim=8, depth=3, width=64)


def test_same_config_same_data_whatever_the_thread_count() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = generate_teacher(SMALL)
        torch.set_num_threads(2)
        two = generate_teacher(SMALL)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_seed_and_shape_change_the_task() -> None:
    _, y, _, _ = generate_teacher(SMALL)
    for change in ({"seed": 1}, {"depth": 4}, {"gain": 2.0}):
        other = TeacherConfig(**{**SMALL.__dict__, **change})
        _, y2, _, _ = generate_teacher(other)
        assert (y != y2).float().mean() > 0.3, change


def test_labelling_does_not_depend_on_the_sample_counts() -> None:
    x = torch.randn(500, SMALL.input_dim, dtype=torch.float64)
    bigger = TeacherConfig(**{**SMALL.__dict__, "train_samples": 9000, "test_samples": 10})
    a = Teacher(SMALL, torch.Generator().manual_seed(SMALL.seed)).labels(x)
    b = Teacher(bigger, torch.Generator().manual_seed(bigger.seed)).labels(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("classes", [2, 10])
def test_classes_are_roughly_balanced(classes: int) -> None:
    cfg = TeacherConfig(**{**SMALL.__dict__, "classes": classes, "train_samples": 20000})
    _, y, _, _ = generate_teacher(cfg)
    share = torch.bincount(y, minlength=classes).float() / len(y)
    assert share.min() > 0.4 / classes and share.max() < 2.0 / classes


def test_loads_as_standardised_vectors_with_its_class_count() -> None:
    ds = load_dataset(DataConfig(name="teacher", teacher=TeacherConfig(**SMALL.__dict__)))
    assert ds.input_shape == (8,) and ds.num_classes == 10
    assert ds.train_x.shape == (3000, 8) and ds.test_x.shape == (1000, 8)
    torch.testing.assert_close(ds.train_x.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.train_x.std(0), torch.ones(8), atol=1e-4, rtol=0)


def test_an_easy_teacher_is_learnt_well_above_chance() -> None:
    cfg = TeacherConfig(train_samples=2000, test_samples=500, input_dim=4, classes=2, depth=1)
    x, y, xt, yt = generate_teacher(cfg)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    opt = torch.optim.Adam(student.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.autograd.backward(torch.nn.functional.cross_entropy(student(x), y))
        opt.step()
    assert (student(xt).argmax(1) == yt).float().mean() > 0.9


def test_teacher_keys_are_checked_and_image_models_refused() -> None:
    cfg = parse_config({}, ["data.name=teacher", "data.teacher.depth=7", "data.teacher.gain=0.5"])
    assert cfg.data.teacher.depth == 7 and cfg.data.teacher.gain == 0.5
    with pytest.raises(ConfigError) as e:
        parse_config({}, ["data.name=teacher", "model.name=resnet", "data.teacher.classes=1"])
    problems = "\n".join(e.value.problems)
    assert "data.teacher.classes: must be >= 2" in problems
    assert "model.name: resnet convolves images" in problems
