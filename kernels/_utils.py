"""Helpers shared by the launchers. Imports torch only: importing this module must not need triton."""

from __future__ import annotations

import torch

#: The 16 NF4 values, indexed by the 4-bit code (bitsandbytes' table, sorted). Kept here, the bottom layer, so
#: that kernels and ops share one copy.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# The wavefront width the launchers assume instead of the device's (None: the device's): the static analysis
# compiles for an AMD GPU from a machine without one (fastlora.benchmarks.static).
SIMULATED_WAVEFRONT: int | None = None


def elementwise_warps(device: torch.device) -> int:
    """Warps for the elementwise kernels' 1024-element blocks: 8 elements, 16 bytes of bf16, a thread, so that
    loads and stores are 128-bit: 4 warps of 32 on NVIDIA, 2 wavefronts of 64 on AMD (4 gave 64-bit accesses on
    gfx942)."""
    wavefront = SIMULATED_WAVEFRONT or (64 if device.type == "cuda" and torch.version.hip else 32)
    return 128 // wavefront


# Set by the test suite's poison fixture: every buffer fastlora allocates starts as NaN (or all ones bits for
# integers), so an output element that a kernel forgets to write fails the comparison instead of passing by luck.
POISON = False


def empty(shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for fastlora's own outputs and workspaces."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return _poison(out) if POISON else out


def empty_like(t: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous torch.empty_like for fastlora's own outputs and workspaces."""
    out = torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)
    return _poison(out) if POISON else out


def empty_like_strided(t: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.empty_like keeping ``t``'s strides (for outputs that must share an input's memory layout)."""
    out = torch.empty_like(t, dtype=dtype or t.dtype, memory_format=torch.preserve_format)
    return _poison(out) if POISON else out


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(-1)
