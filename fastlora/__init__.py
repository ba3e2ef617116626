"""fastlora: fused kernels for LoRA and QLoRA fine-tuning of Hugging Face models.

Importing fastlora touches no GPU, sets no environment variable and works without Triton; devices are probed
and native code is built on first use.

Example:
    >>> import fastlora
    >>> fastlora.device_info().compute_dtype
    torch.float32
    >>> fastlora.resolve_backend("swiglu", "cpu", torch.float32)
    (<Backend.CPP: 'cpp'>, 'cpp: native C++ kernel')
"""

from __future__ import annotations

import importlib.metadata

from .checkpointing import OffloadedCheckpointing, OffloadStats
from .device import DeviceInfo, device_info
from .dispatch import Backend, BackendUnavailableError, resolve_backend, use_backend
from .ops import (
    LoRAProjection,
    NF4Weight,
    apply_rope,
    cross_entropy,
    dequantize_nf4,
    fused_linear_cross_entropy,
    lora_linear,
    lora_mlp,
    lora_qkv,
    quantize_nf4,
    swiglu,
)
from .patching import PatchReport, patch, unpatch
from .plan import Plan, plan

try:
    __version__ = importlib.metadata.version("fastlora")
except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "DeviceInfo",
    "LoRAProjection",
    "NF4Weight",
    "OffloadStats",
    "OffloadedCheckpointing",
    "PatchReport",
    "Plan",
    "apply_rope",
    "cross_entropy",
    "dequantize_nf4",
    "device_info",
    "fused_linear_cross_entropy",
    "lora_linear",
    "lora_mlp",
    "lora_qkv",
    "patch",
    "plan",
    "quantize_nf4",
    "resolve_backend",
    "swiglu",
    "unpatch",
    "use_backend",
    "__version__",
]
