"""Model patching: which modules of a transformers or PEFT model take fastlora's fused paths, and why not."""

from .coverage import Coverage, CoverageReport
from .families import FAMILIES, Family, family_of
from .patch import coverage, patch, unpatch
from .peft_lora import LoRAArgs, NothingToFuse, UnsupportedLoRA, lora_args
from .report import PatchReport

__all__ = ["FAMILIES", "Coverage", "CoverageReport", "Family", "LoRAArgs", "NothingToFuse", "PatchReport",
           "UnsupportedLoRA", "coverage", "family_of", "lora_args", "patch", "unpatch"]
