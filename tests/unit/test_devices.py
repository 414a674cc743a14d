"""GPU figures: NVML's failure policy (NVML and the clock replaced: they are the boundaries),
and on a CUDA device the figures' values."""

from __future__ import annotations

import pytest
import torch

from decoupled.devices import BACKOFF_S, FAILURES_BEFORE_BACKOFF, UtilizationProbe, gpu_figures

DEVICE = torch.device("cuda", 0)


class _Nvml:
    """Answers with the values given, raising the exceptions among them."""

    def __init__(self, *answers: float | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, device: torch.device) -> float:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_passing_error_costs_one_report_only() -> None:
    nvml = _Nvml(40.0, RuntimeError("NVML_ERROR_UNKNOWN"), 55.0)
    probe = UtilizationProbe(nvml, _Clock())
    assert [probe(DEVICE) for _ in range(3)] == [40.0, None, 55.0]


def test_repeated_errors_back_off_and_a_success_resets() -> None:
    clock = _Clock()
    errors = [RuntimeError("gone")] * FAILURES_BEFORE_BACKOFF
    nvml = _Nvml(*errors, RuntimeError("still gone"), 70.0, RuntimeError("again"), 75.0)
    probe = UtilizationProbe(nvml, clock)
    assert [probe(DEVICE) for _ in errors] == [None] * FAILURES_BEFORE_BACKOFF
    assert probe(DEVICE) is None and nvml.calls == FAILURES_BEFORE_BACKOFF  # not asked
    clock.now += BACKOFF_S
    assert probe(DEVICE) is None and nvml.calls == FAILURES_BEFORE_BACKOFF + 1  # asked, failed
    clock.now += BACKOFF_S / 2
    assert probe(DEVICE) is None and nvml.calls == FAILURES_BEFORE_BACKOFF + 1
    clock.now += BACKOFF_S / 2
    assert probe(DEVICE) == 70.0
    assert probe(DEVICE) is None  # one failure after a success: no back-off yet
    assert probe(DEVICE) == 75.0


def test_without_the_module_the_figure_is_off_for_good() -> None:
    nvml = _Nvml(ModuleNotFoundError("No module named 'pynvml'"), 10.0)
    probe = UtilizationProbe(nvml, _Clock())
    assert probe(DEVICE) is None and probe(DEVICE) is None
    assert nvml.calls == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_figures_on_a_cuda_device() -> None:
    device = torch.device("cuda", 0)
    before = gpu_figures(device)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    after = gpu_figures(device)
    assert after["gpu_mem_mb"] >= before["gpu_mem_mb"] + 63
    assert after["gpu_max_mem_mb"] >= after["gpu_mem_mb"]
    # nvidia-ml-py is a dependency: the whole device's utilisation must be there.
    assert "gpu_util" in after, "NVML gave no utilisation (see the log for why)"
    assert 0.0 <= after["gpu_util"] <= 100.0
    del block
