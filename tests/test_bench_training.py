"""The training benchmarks (offloaded checkpointing, max context): the search, and a quick run on a CPU."""

import pytest

from fastlora.benchmarks import cli
from fastlora.benchmarks.training import fit_memory, search_max


@pytest.mark.parametrize("threshold", [4096, 4097, 5000, 8191, 65536, 1 << 20])
def test_search_max_finds_the_largest_length_that_fits(threshold):
    probes = []

    def fits(n):
        probes.append(n)
        return n <= threshold

    assert search_max(fits, start=4096, limit=1 << 20, resolution=512) == min(threshold // 512 * 512, 1 << 20)
    assert len(probes) <= 2 * 20  # doubling, then bisection: logarithmic


def test_search_max_edges():
    assert search_max(lambda n: False, start=1024, limit=8192, resolution=1024) == 0
    assert search_max(lambda n: True, start=1024, limit=6000, resolution=1024) == 5120  # clipped to the limit
    with pytest.raises(ValueError, match="multiple of resolution"):
        search_max(lambda n: True, start=1000, limit=8192, resolution=1024)


def test_fit_memory():
    intercept, slope = fit_memory([(4096, 10 * 2**30 + 4096 * 300_000), (8192, 10 * 2**30 + 8192 * 300_000),
                                   (16384, 10 * 2**30 + 16384 * 300_000)])
    assert abs(intercept - 10 * 2**30) < 1 and abs(slope - 300_000) < 1e-6
    with pytest.raises(ValueError, match="two lengths"):
        fit_memory([(4096, 1), (4096, 2)])


def test_bench_checkpointing_quick_on_cpu(capsys):
    assert cli.main(["--checkpointing", "--quick", "--no-save", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fastlora-offload S64" in out and "offloaded / in-GPU time" in out


def test_bench_max_context_needs_a_gpu(capsys):
    assert cli.main(["--max-context", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_max_context_predicts_from_the_peaks_and_verifies_short_ones(monkeypatch):
    """The orchestration, with a simulated GPU: peaks of 1 GB + 100 kB a token, 4 GB to fill."""
    import torch

    from fastlora.benchmarks import training
    from fastlora.benchmarks.timing import Timing

    def peak(n):
        return 10**9 + 100_000 * n

    def step(model, tokens, seed=0):
        if peak(tokens) > 4 * 10**9:
            raise torch.OutOfMemoryError("simulated")
        return torch.tensor(0.0)

    monkeypatch.setattr(training, "configure", lambda model, setup: None)
    monkeypatch.setattr(training, "train_step", step)
    monkeypatch.setattr(training, "measure_step",
                        lambda model, setup, n, reps=1: training.Step(setup, n, Timing(1.0, 1.0, 1.0, 1), peak(n), 0.0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 10**9, 8 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    ctx = training.max_context(torch.nn.Linear(2, 2), "hf")
    assert ctx.predicted == 30_000 // 1024 * 1024 and ctx.verified.tokens == ctx.predicted
    long = training.max_context(torch.nn.Linear(2, 2), "hf", verify_below=16384)
    assert long.predicted == ctx.predicted and long.verified is None  # too long to try: predicted only
