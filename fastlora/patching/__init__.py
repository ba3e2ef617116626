"""Model patching: which modules of a transformers or PEFT model take fastlora's fused paths, and why not."""

from .families import FAMILIES, Family, family_of
from .patch import patch, unpatch
from .peft_lora import LoRAArgs, UnsupportedLoRA, lora_args
from .report import PatchReport

__all__ = ["FAMILIES", "Family", "LoRAArgs", "PatchReport", "UnsupportedLoRA", "family_of", "lora_args", "patch",
           "unpatch"]
