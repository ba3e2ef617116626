"""How long a call takes and how much memory it allocates, on a GPU or on the CPU.

On CUDA the times come from ``triton.testing.do_bench`` (it flushes the L2 cache between calls and times
with events); on the CPU from a wall-clock loop bounded by a time budget. Memory is the peak of torch
allocations made during one call: the CUDA caching allocator's counters on a GPU, the profiler's memory events
on the CPU.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# Seconds of timed calls per case. The CPU timer stops at the budget (after at least _MIN_REPS calls), so a
# slow case costs about one budget and a fast one gets many samples.
CPU_BUDGET_S = {False: 1.0, True: 0.05}
_MIN_REPS = 3
_MAX_REPS = 10_000
# do_bench's warm-up and measurement windows in ms: its defaults for full runs, a fifth of them when quick.
_CUDA_WINDOWS_MS = {False: (25, 100), True: (5, 20)}


@dataclass(frozen=True)
class Timing:
    """Median and 20th/80th percentiles of one call, in milliseconds, and how many calls the CPU timer made.

    ``reps`` is None under do_bench, which chooses its own count and does not report it.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int | None


def time_fn(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> Timing:
    """Time ``fn`` on ``device``: do_bench on CUDA (when Triton imports), else a wall-clock loop.

    Example:
        >>> x = torch.randn(1024, 1024)
        >>> t = time_fn(lambda: x @ x, torch.device("cpu"), quick=True)
        >>> t.p20_ms <= t.median_ms <= t.p80_ms
        True
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            warmup, rep = _CUDA_WINDOWS_MS[quick]
            median, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
            return Timing(float(median), float(p20), float(p80), None)
        return wall_clock(fn, budget_s=CPU_BUDGET_S[quick], sync=torch.cuda.synchronize)
    return wall_clock(fn, budget_s=CPU_BUDGET_S[quick])


def wall_clock(fn: Callable[[], object], *, budget_s: float, sync: Callable[[], None] | None = None,
               min_reps: int = _MIN_REPS, max_reps: int = _MAX_REPS) -> Timing:
    """Time ``fn`` call by call with ``perf_counter`` until ``budget_s`` is spent (at least ``min_reps`` calls).

    ``sync`` is called after each call, inside the timed region, for devices that run asynchronously.

    Example:
        >>> wall_clock(lambda: sum(range(1000)), budget_s=0.01).reps >= 3
        True
    """
    fn()  # warm-up: first-call costs (allocator growth, lazy init) are not what is measured
    if sync is not None:
        sync()
    samples: list[float] = []
    # A collection pause inside one sample would land in the 80th percentile of a short run.
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        deadline = time.perf_counter() + budget_s
        while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < deadline):
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            samples.append(time.perf_counter() - start)
    finally:
        if was_enabled:
            gc.enable()
    return summarize([s * 1e3 for s in samples])


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median, 20th and 80th percentiles (linear interpolation) of per-call times in milliseconds.

    Example:
        >>> summarize([1.0, 2.0, 3.0, 4.0, 5.0])
        Timing(median_ms=3.0, p20_ms=1.8, p80_ms=4.2, reps=5)
    """
    if not samples_ms:
        raise ValueError("summarize: no samples")
    ms = torch.tensor(list(samples_ms), dtype=torch.float64)
    p50, p20, p80 = torch.quantile(ms, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return Timing(p50, p20, p80, len(ms))


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of torch allocations made during one call of ``fn`` (beyond what was allocated before).

    Example:
        >>> peak_memory(lambda: torch.empty(1 << 20), torch.device("cpu")) >= 4 << 20
        True
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    return _cpu_peak_memory(fn)


def _cpu_peak_memory(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    # Kineto logs every profiler start and stop to stderr, which would interleave with the progress bar and
    # the tables; level 6 silences it. Read when the profiler first starts, so set just before; a value the
    # user chose wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each "[memory]" event is one allocation (positive bytes) or free (negative); the running sum in time
    # order is what the call holds, and its maximum is the peak.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak
