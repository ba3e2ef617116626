"""Reading a PEFT LoRA layer into :func:`fastlora.lora_linear`'s arguments, or saying why it cannot be fused.

PEFT's forward (peft 0.21): the base output on the un-dropped input, then for each active adapter present in
``lora_A``: ``lora_B(lora_A(dropout(x.to(lora_A.weight.dtype)))) * scaling``. Variants (DoRA and the others PEFT
registers in ``lora_variant``) compute something else, so such a layer keeps PEFT's forward. Everything is read on
every call: PEFT may change scalings, active adapters or (on merge/unmerge of a 4-bit layer) the weight itself.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..ops.nf4_weight import NF4Weight


class UnsupportedLoRA(Exception):
    """The layer cannot take the fused path; the message is the reason the patch report shows."""


class NothingToFuse(UnsupportedLoRA):
    """No active adapter at this moment (disabled, merged): the base layer alone runs, which is not a fallback."""


@dataclass(frozen=True)
class LoRAArgs:
    """What :func:`fastlora.lora_linear` needs for one PEFT layer at this moment (at least one adapter)."""

    base: torch.Tensor | NF4Weight
    bias: torch.Tensor | None
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    scaling: list[float]
    dropout_p: list[float]
    lora_bias: list[torch.Tensor | None]
    compute_dtype: torch.dtype | None


def lora_args(layer: torch.nn.Module) -> LoRAArgs:
    """The fused path's arguments for a PEFT LoRA ``Linear`` or bitsandbytes ``Linear4bit``, as of now.

    Raises:
        UnsupportedLoRA: with the reason, e.g. ``"DoRA adapter 'default'"``, when PEFT's own forward must run.
        NothingToFuse: (an UnsupportedLoRA) no adapter is active now: disabled, merged, or none on this layer.

    Example:
        >>> args = lora_args(model.base_model.model.model.layers[0].self_attn.q_proj)
        >>> y = fastlora.lora_linear(x, args.base, args.A, args.B, args.scaling, bias=args.bias,
        ...                          dropout_p=args.dropout_p, lora_bias=args.lora_bias,
        ...                          compute_dtype=args.compute_dtype)
    """
    base_layer = layer.get_base_layer()
    if getattr(layer, "fan_in_fan_out", False):
        raise UnsupportedLoRA("fan_in_fan_out weight (Conv1D layout)")
    if not getattr(layer, "cast_input_dtype_enabled", True):
        raise UnsupportedLoRA("cast_input_dtype disabled")
    if hasattr(getattr(base_layer, "weight", None), "ds_id"):
        # ZeRO-3 gathers a module's parameters only around that module's own forward, which the fused path skips.
        raise UnsupportedLoRA("parameters partitioned by DeepSpeed ZeRO-3 (gathered only for PEFT's own forward)")
    base, compute_dtype = _base_weight(base_layer)
    active = [] if layer.disable_adapters or layer.merged else \
        [name for name in layer.active_adapters if name in layer.lora_A]
    A, B, scaling, dropout_p, lora_bias = [], [], [], [], []
    for name in active:
        variant = layer.lora_variant.get(name) if hasattr(layer, "lora_variant") else None
        if variant is not None:
            kind = type(variant).__name__.removesuffix("LinearVariant").removesuffix("Variant") or "a variant"
            raise UnsupportedLoRA(f"{'DoRA' if 'dora' in kind.lower() else kind} adapter {name!r}")
        dropout = layer.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout):
            dropout_p.append(dropout.p if dropout.training else 0.0)
        elif isinstance(dropout, torch.nn.Identity):
            dropout_p.append(0.0)
        else:
            raise UnsupportedLoRA(f"adapter {name!r} has a {type(dropout).__name__} dropout")
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear or lora_a.bias is not None:
            raise UnsupportedLoRA(f"adapter {name!r} is not a pair of plain linear layers")
        A.append(lora_a.weight)
        B.append(lora_b.weight)
        lora_bias.append(lora_b.bias)
        scaling.append(float(layer.scaling[name]))
    if not A:
        raise NothingToFuse("adapters disabled" if layer.disable_adapters else "merged" if layer.merged
                            else "no active adapter on this layer")
    return LoRAArgs(base, base_layer.bias, A, B, scaling, dropout_p, lora_bias, compute_dtype)


def _base_weight(base_layer: torch.nn.Module) -> tuple[torch.Tensor | NF4Weight, torch.dtype | None]:
    weight = getattr(base_layer, "weight", None)
    if getattr(weight, "quant_state", None) is not None or type(weight).__name__ == "Params4bit" \
            or _is_bnb_4bit(type(base_layer)):
        return _nf4_view(base_layer, weight), getattr(base_layer, "compute_dtype", None)
    if type(base_layer) is not torch.nn.Linear:
        raise UnsupportedLoRA(f"base layer is a {type(base_layer).__name__}, not nn.Linear or bitsandbytes Linear4bit")
    return weight, None


def _is_bnb_4bit(cls: type) -> bool:
    """Whether a layer class is bitsandbytes' Linear4bit (or a subclass), without importing bitsandbytes."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in cls.__mro__)


# NF4Weight.from_bnb costs ~0.1 ms (attribute checks, views): too much on every projection of every step. The
# view is kept per Params4bit object and reused only while the object, its storage and its quant state are the
# ones it was made from (PEFT's 4-bit merge/unmerge installs a new Params4bit; .to() moves the storage).
_NF4_VIEWS: dict[int, tuple[weakref.ref, tuple, NF4Weight]] = {}  # by id(Params4bit); tensors compare elementwise


def _nf4_view(base_layer: torch.nn.Module, weight: torch.Tensor) -> NF4Weight:
    state = getattr(weight, "quant_state", None)
    if state is None:  # stripped by a wrapper (FSDP2): the layer's own, as from_bnb reads it
        state = getattr(base_layer, "quant_state", None)
    key = (weight.data_ptr(), id(state), state.absmax.data_ptr() if state is not None else None)
    cached = _NF4_VIEWS.get(id(weight))
    if cached is not None and cached[0]() is weight and cached[1] == key:
        return cached[2]
    try:
        view = NF4Weight.from_bnb(base_layer)
    except (TypeError, ValueError) as e:
        raise UnsupportedLoRA(str(e)) from None
    if cached is None or cached[0]() is not weight:
        weakref.finalize(weight, _NF4_VIEWS.pop, id(weight), None)
    _NF4_VIEWS[id(weight)] = (weakref.ref(weight), key, view)
    return view
