"""The ops under ``torch.autocast`` (what HF Trainer's ``bf16=True`` / ``fp16=True`` runs a model's forward in).

Two rules:
- Inside an op, autocast is off. Autocast recasts the GEMMs it sees (``mm``, ``addmm``, ...) to its dtype, so an
  op that keeps fp32 adapters beside bf16 activations, or accumulates into a buffer in place, would get operands of
  mixed dtypes and fail (or silently change precision). The registered implementations, the functional APIs'
  bodies (which hold the autograd Functions' forward) and the backward of the Functions that run GEMMs themselves
  (autograd may run a backward inside the caller's autocast region) run with it off.
- The ops that stand in for a linear layer decide their GEMM dtype as ``F.linear`` does under autocast: the
  autocast dtype of the input's device (see :func:`autocast_dtype`); the functional APIs apply it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

# The device types whose autocast can be on around a fastlora op (ROCm is "cuda").
_DEVICE_TYPES = ("cpu", "cuda")

F = TypeVar("F", bound=Callable[..., object])


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes a GEMM on ``t``'s device in, or None where autocast is off there.

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     autocast_dtype(torch.ones(2))
        torch.bfloat16
    """
    kind = t.device.type
    if kind in _DEVICE_TYPES and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _any_enabled() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def autocast_off(fn: F) -> F:
    """``fn`` run with autocast off on every device (a no-op check when it is off already).

    Example:
        >>> @staticmethod
        ... @autocast_off
        ... def backward(ctx, dy): ...
    """
    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        if not _any_enabled():
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device``'s type, where the op's GEMMs run (nothing when it is off).

    Example:
        >>> with autocast_disabled(x.device):
        ...     y = torch.mm(x, w.t())          # in x's dtype whatever the caller's autocast
    """
    if device.type in _DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
