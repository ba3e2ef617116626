"""Model patching: which modules of a transformers or PEFT model can take fastlora's fused paths, and why not."""

from .peft_lora import LoRAArgs, UnsupportedLoRA, lora_args

__all__ = ["LoRAArgs", "UnsupportedLoRA", "lora_args"]
