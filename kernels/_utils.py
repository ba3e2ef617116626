"""Helpers shared by the launchers. Imports torch only: importing this module must not need triton."""

from __future__ import annotations

import torch

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


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(-1)
