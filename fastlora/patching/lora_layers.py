"""PEFT LoRA linear layers on the fused path: each instance's class is swapped for a subclass whose forward calls
:func:`fastlora.lora_linear`, and falls back to PEFT's own forward whenever the layer is not plain LoRA at that
moment (adapters disabled or merged, a DoRA adapter made active later, PEFT's ``adapter_names`` keyword).

Swapping ``__class__`` (never assigning ``forward`` on an instance) keeps every hook, ``isinstance`` check and
state dict key PEFT relies on; undo swaps the original class back.
"""

from __future__ import annotations

import contextlib

import torch

from ..dispatch import use_backend
from ..ops.lora import lora_linear
from .peft_lora import NothingToFuse, UnsupportedLoRA, lora_args
from .qkv import lent_output

_FAST: dict[type, type] = {}


def _forward(self: torch.nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    original = type(self)._fastlora_original
    coverage = self._fastlora_coverage
    if args or kwargs:  # adapter_names (mixed batches) and anything else only PEFT's forward knows
        coverage.fallback(f"called with {', '.join(kwargs) or 'extra positional arguments'}, which only PEFT's "
                          "forward takes")
        return original.forward(self, x, *args, **kwargs)
    lent = lent_output(self, x)  # made for this layer by its attention's lora_qkv (see .qkv)
    if lent is not None:  # counted in the attention's coverage
        return lent
    try:
        a = lora_args(self)
    except NothingToFuse as e:
        coverage.nothing_to_do(str(e))
        return original.forward(self, x)
    except UnsupportedLoRA as e:
        coverage.fallback(str(e))
        return original.forward(self, x)
    coverage.hit()
    backend = self._fastlora_backend
    # No context when no backend was asked for at patch time: entering one costs ~20 us a call.
    with use_backend(backend) if backend is not None else contextlib.nullcontext():
        return lora_linear(x, a.base, a.A, a.B, a.scaling, bias=a.bias, dropout_p=a.dropout_p,
                           lora_bias=a.lora_bias, compute_dtype=a.compute_dtype)


def fast_class(cls: type) -> type:
    """The fused-path subclass of a PEFT LoRA layer class (made once per class)."""
    if cls not in _FAST:
        _FAST[cls] = type(f"FastLoRA{cls.__name__}", (cls,), {
            "forward": _forward, "_fastlora_original": cls, "_fastlora_lora_linear": True, "__module__": __name__,
            "__doc__": cls.__doc__})
    return _FAST[cls]


def lora_layer_classes() -> tuple[type, ...]:
    """PEFT's plain LoRA linear classes (bitsandbytes' 4-bit one when PEFT can import it)."""
    from peft.tuners import lora

    classes = [lora.Linear]
    try:
        classes.append(lora.Linear4bit)
    except AttributeError:  # bitsandbytes missing: PEFT does not define it
        pass
    return tuple(classes)
