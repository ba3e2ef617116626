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
