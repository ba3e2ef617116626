"""The training benchmarks (offloaded checkpointing, max context): the search, and a quick run on a CPU."""

import pytest

from fastlora.benchmarks import cli
from fastlora.benchmarks.training import search_max


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


def test_bench_checkpointing_quick_on_cpu(capsys):
    assert cli.main(["--checkpointing", "--quick", "--no-save", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fastlora-offload S64" in out and "offloaded / in-GPU time" in out


def test_bench_max_context_needs_a_gpu(capsys):
    assert cli.main(["--max-context", "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
