"""The ops: references, torch.library registrations, autograd Functions and the functional API."""

from .cross_entropy import cross_entropy
from .linear_cross_entropy import fused_linear_cross_entropy
from .lora import lora_linear
from .lora_mlp import LoRAProjection, lora_mlp
from .lora_qkv import lora_qkv
from .nf4 import dequantize_nf4
from .nf4_weight import NF4Weight, quantize_nf4
from .rope import apply_rope
from .swiglu import swiglu, swiglu_reference

__all__ = ["LoRAProjection", "NF4Weight", "apply_rope", "cross_entropy", "dequantize_nf4", "fused_linear_cross_entropy",
           "lora_linear", "lora_mlp", "lora_qkv", "quantize_nf4", "swiglu", "swiglu_reference"]
