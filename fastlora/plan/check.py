"""Measuring what a plan predicts: the same training step run for real on a CPU, measured two ways."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..tuning import off as tuning_off
from .step import build_model, count_model, training_step
from .tracker import AllocationTracker


@dataclass
class Measured:
    """A real step's peak: by the allocation tracker on real tensors, and by the CPU allocator's own events (torch
    profiler, ``profile_memory``), which also see what kernels allocate inside (bitsandbytes' dequantize in its
    4-bit GEMM, C++ kernels' scratch); both include the model's storages held before the step."""

    tracker_peak: int
    allocator_peak: int
    tracker: AllocationTracker


def measure_cpu_step(config: Any, *, batch: int, seq_len: int, rank: int = 16, quant: str | None = None,
                     checkpointing: str | None = None, patched: bool = True, dtype: torch.dtype = torch.float32,
                     optimizer: str = "adamw", seed: int = 0) -> Measured:
    """Build the model for real on the CPU (random weights; NF4 by bitsandbytes' own quantization) and run one
    training step as :func:`fastlora.plan` does on meta, with tuning off (the static choices a plan takes).

    Example:
        >>> m = measure_cpu_step(config, batch=2, seq_len=64, rank=8, quant="nf4")
        >>> m.tracker_peak, m.allocator_peak
    """
    from torch.profiler import ProfilerActivity, profile

    import fastlora

    from ..ops._workspace import release_workspaces

    torch.manual_seed(seed)
    with tuning_off():
        model = build_model(config, device="cpu", dtype=dtype, rank=rank, quant=quant, attention="sdpa")
        if checkpointing == "standard":
            fastlora.checkpointing.enable_checkpointing(model)
        elif checkpointing is not None:
            raise ValueError(f"measure_cpu_step: checkpointing {checkpointing!r} is not measured on a CPU (offload "
                             "moves nothing there)")
        if patched:
            fastlora.patch(model)
        model_bytes = AllocationTracker("cpu")
        count_model(model_bytes, model)
        tracker = AllocationTracker("cpu", descend=True)
        release_workspaces()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            training_step(model, tracker, batch=batch, seq_len=seq_len, device="cpu", optimizer=optimizer)
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = high = 0
    for e in events:
        live += e.nbytes()
        high = max(high, live)
    return Measured(tracker.peak.bytes, model_bytes.live + high, tracker)
