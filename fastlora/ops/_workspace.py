"""Scratch buffers reused across calls: one per (purpose, dtype, device) and thread, grown to the largest request.

An NF4 base weight is dequantized into one of these on every forward and backward instead of into a new
allocation; the layers of a model run one after another on a stream, so they can share it. Autograd runs the
backward on its own thread, which gets its own buffer.
"""

from __future__ import annotations

import math
import threading

import torch

from ..kernels._utils import empty

_local = threading.local()


def workspace(purpose: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
              device: torch.device) -> torch.Tensor:
    """A contiguous ``shape`` view of this thread's buffer for ``purpose``; its contents are undefined.

    The view is valid until the next request for the same purpose, dtype and device on this thread.

    Example:
        >>> w = workspace("lora_nf4", (4096, 4096), torch.bfloat16, torch.device("cuda"))
    """
    buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    key = (purpose, dtype, torch.device(device))
    numel = math.prod(shape)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # free the old one before the new one is allocated
        buf = buffers[key] = empty((numel,), dtype=dtype, device=device)
    return buf[:numel].view(shape)


def release_workspaces() -> None:
    """Free this thread's buffers (they are allocated again on the next request).

    Example:
        >>> release_workspaces()
    """
    _local.__dict__.pop("buffers", None)
