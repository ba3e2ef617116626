"""The devices a plan can be made for, and the stated models of what a GPU takes that meta tensors cannot show.

Each constant says what it models and where the figure comes from; the plan lists every one it adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..device import DeviceInfo

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class GPU:
    """One GPU model: usable memory in bytes (what ``nvidia-smi --query-gpu=memory.total`` reports, which is also
    ``torch.cuda.get_device_properties().total_memory`` up to a few MiB), compute capability, compute dtype."""

    name: str
    total_bytes: int
    capability: tuple[int, int]

    @property
    def compute_dtype(self) -> torch.dtype:
        # The precision policy of DESIGN.md: bf16 from compute capability 8.0, fp16 before.
        return torch.bfloat16 if self.capability >= (8, 0) else torch.float16

    def device_info(self) -> DeviceInfo:
        """What ``fastlora.device_info`` would report on this GPU (with Triton usable), for the dispatcher."""
        bf16 = self.capability >= (8, 0)
        return DeviceInfo(vendor="nvidia", device_type="cuda", index=0, name=self.name, capability=self.capability,
                          arch=f"sm_{self.capability[0]}{self.capability[1]}", total_memory=self.total_bytes,
                          free_memory=self.total_bytes, bf16=bf16, tf32=bf16, compute_dtype=self.compute_dtype,
                          triton_importable=True, triton_usable=True, triton_reason="planned: Triton assumed")


# memory.total in MiB as nvidia-smi prints it for each board (vendor spec sheets give the marketing GB; these are
# the figures users see, e.g. 81559 MiB on an H100 80GB HBM3, 15360 MiB on a T4). "8GB" is any 8 GiB card.
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("H200-141GB", 143771 * MiB, (9, 0)),
    GPU("H100-80GB", 81559 * MiB, (9, 0)),
    GPU("A100-80GB", 81920 * MiB, (8, 0)),
    GPU("A100-40GB", 40960 * MiB, (8, 0)),
    GPU("L40S-48GB", 46068 * MiB, (8, 9)),
    GPU("A6000-48GB", 49140 * MiB, (8, 6)),
    GPU("L4-24GB", 23034 * MiB, (8, 9)),
    GPU("RTX4090-24GB", 24564 * MiB, (8, 9)),
    GPU("A10-24GB", 23028 * MiB, (8, 6)),
    GPU("T4-16GB", 15360 * MiB, (7, 5)),
    GPU("RTX3060-12GB", 12288 * MiB, (8, 6)),
    GPU("8GB", 8192 * MiB, (8, 6)),
)}


def find_gpu(name: str) -> GPU:
    """The table entry for ``name`` (case and ``-``/``_``/space insensitive: ``"h100"`` finds ``H100-80GB``).

    Raises:
        ValueError: no such GPU, with the known names.

    Example:
        >>> find_gpu("a100-40gb").total_bytes
        42949672960
    """
    def norm(s: str) -> str:
        return "".join(c for c in s.lower() if c.isalnum())

    key = norm(name)
    hits = [g for n, g in GPUS.items() if norm(n) == key] or [g for n, g in GPUS.items() if norm(n).startswith(key)]
    if len(hits) != 1:
        raise ValueError(f"fastlora.plan: unknown GPU {name!r}; known: {', '.join(GPUS)} (or give bytes)")
    return hits[0]


def cuda_context_bytes(gpu: GPU | None) -> int:
    """The CUDA context, cuBLAS/cuDNN handles and loaded kernels: memory the driver takes outside PyTorch's
    allocator. Stated model: 500 MiB on any GPU (measured ~450-600 MiB with lazy module loading, the default since
    CUDA 11.7, for a PyTorch training process on A100/H100: ``nvidia-smi`` minus ``torch.cuda.memory_reserved``);
    0 on a CPU."""
    return 0 if gpu is None else 500 * MiB


def cublas_workspace_bytes(gpu: GPU | None) -> int:
    """cuBLAS workspaces, allocated by PyTorch's caching allocator per (thread, stream) handle. Stated model from
    PyTorch's ``getChosenWorkspaceSize`` (aten/src/ATen/cuda/CublasHandlePool.cpp): 32 MiB on Hopper (sm_90),
    ``4096 KiB * 2 + 16 KiB * 8`` elsewhere; two handles, since autograd runs the backward on its own thread."""
    if gpu is None:
        return 0
    per_handle = 32 * MiB if gpu.capability >= (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8
    return 2 * per_handle


def caching_allocator_rounding(nbytes: int) -> int:
    """What PyTorch's CUDA caching allocator takes for a request of ``nbytes``: blocks in multiples of 512 bytes;
    a request over 10 MiB gets its own segment, rounded up to 2 MiB (``round_size`` and ``get_allocation_size``
    in c10/cuda/CUDACachingAllocator.cpp). Fragmentation between segments is not modelled.

    Example:
        >>> caching_allocator_rounding(1), caching_allocator_rounding(11 * 2**20 + 1)
        (512, 12582912)
    """
    if nbytes > 10 * MiB:
        return -(-nbytes // (2 * MiB)) * 2 * MiB
    return max(512, -(-nbytes // 512) * 512)
