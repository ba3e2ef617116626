"""Every case of every suite under pytest-benchmark, after the correctness gate (cases come from conftest.py).

A fastlora provider that fails the gate or crashes fails its test; an unavailable provider, or a baseline that
disagrees with the reference, is skipped with the reason.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastlora.benchmarks.harness import Provider, Roofline, Shape, Suite, prepare
from fastlora.benchmarks.timing import summarize


def test_case(benchmark, bench_case: tuple[Suite, Shape, str, Provider], bench_device: torch.device,
              bench_quick: bool, request: pytest.FixtureRequest) -> None:
    suite, shape, mode, provider = bench_case
    case, result = prepare(suite, provider, mode, shape, bench_device, suite.dtype(bench_device),
                           quick=bench_quick)
    if case is None:
        message = f"{provider.name} ({result.status}): {result.reason}"
        if result.fatal:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

    fn = case.fn
    if bench_device.type == "cuda":
        def fn() -> None:
            # GPU calls return before the kernels finish: pytest-benchmark's wall clock needs the wait.
            case.fn()
            torch.cuda.synchronize(bench_device)

    benchmark.group = f"{suite.name} {result.shape} {mode}"
    benchmark.extra_info.update(suite=suite.name, provider=provider.name, mode=mode, shape=result.shape,
                                dtype=result.dtype, max_error=result.max_error)
    benchmark(fn)

    if benchmark.stats is not None:  # None under --benchmark-disable: nothing was timed
        roofline: Roofline | None = request.getfixturevalue("bench_roofline")
        timing = summarize([s * 1e3 for s in benchmark.stats.stats.data])
        timed = dataclasses.replace(result, timing=timing).with_roofline(roofline)
        benchmark.extra_info.update(p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, metric=timed.metric,
                                    achieved=timed.achieved, roofline_share=timed.roofline_share)
        assert timed.achieved is not None and timed.achieved > 0
