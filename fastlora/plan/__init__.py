"""Memory planning: what a LoRA/QLoRA training step needs on a device, from one step run on meta tensors.

Example:
    >>> import fastlora
    >>> print(fastlora.plan("llama-3.1-8b", seq_len=2048, quant="nf4", device="H100-80GB"))
"""

from __future__ import annotations

from .devices import GPU, GPUS, find_gpu
from .planner import Plan, plan
from .shapes import KNOWN_CONFIGS, load_config
from .tracker import AllocationTracker

__all__ = ["GPU", "GPUS", "KNOWN_CONFIGS", "AllocationTracker", "Plan", "find_gpu", "load_config", "plan"]
