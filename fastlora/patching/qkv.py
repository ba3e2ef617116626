"""The q/k/v patch: an attention's three LoRA projections of one input as one :func:`fastlora.lora_qkv`.

transformers' attention calls ``q_proj``, ``k_proj`` and ``v_proj`` on the same hidden states. The attention
module's class is swapped for a subclass whose forward computes the three outputs with one ``lora_qkv`` and lends
them, through a context variable, to the (patched) projection layers for the time of the original forward: a
layer called with that very input tensor returns its lent output, any other call computes as usual. So no
attention forward is copied, and Qwen3's q/k norms, Gemma's scaling or a family's RoPE stay transformers' code.
The forward checks on every call that the three layers are still plain, one-adapter LoRA layers on the fused path
(PEFT state can change) and otherwise runs the original forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch

from ..dispatch import use_backend
from ..ops.lora_qkv import lora_qkv
from .families import Family
from .peft_lora import LoRAArgs, NothingToFuse, UnsupportedLoRA, lora_args

_LENT: contextvars.ContextVar[dict[int, tuple[torch.Tensor, torch.Tensor]] | None] = \
    contextvars.ContextVar("fastlora_qkv", default=None)
_FAST: dict[tuple[type, Family], type] = {}


def lent_output(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The output computed for ``layer`` by its attention's ``lora_qkv``, if ``x`` is the input it was made for."""
    lent = _LENT.get()
    hit = lent.get(id(layer)) if lent is not None else None
    if hit is None or hit[0] is not x:
        return None
    del lent[id(layer)]  # taken: what is left after the attention's forward was computed for nothing
    return hit[1]


def qkv_arguments(attention: torch.nn.Module, family: Family) -> tuple[list[torch.nn.Module], list[LoRAArgs]]:
    """The three projection layers of ``attention`` and their arguments, or UnsupportedLoRA with the reason."""
    if len(family.qkv) != 3:
        raise UnsupportedLoRA(f"{'/'.join(family.qkv)} is already one projection")
    layers = [getattr(attention, name, None) for name in family.qkv]
    if not all(getattr(type(layer), "_fastlora_lora_linear", False) for layer in layers):
        raise UnsupportedLoRA("q, k and v are not all LoRA layers on fastlora.lora_linear")
    try:
        args = [lora_args(layer) for layer in layers]
    except NothingToFuse:
        if all(not lora_args_or_none(layer) for layer in layers):
            raise
        raise UnsupportedLoRA("q, k and v need one active adapter each, without lora_bias") from None
    if any(len(a.A) != 1 or a.lora_bias[0] is not None for a in args):
        raise UnsupportedLoRA("q, k and v need one active adapter each, without lora_bias")
    if len({a.compute_dtype for a in args}) != 1:
        raise UnsupportedLoRA("q, k and v compute in different dtypes")
    return layers, args


def lora_args_or_none(layer: torch.nn.Module) -> LoRAArgs | None:
    """The layer's arguments, or None when it has no active adapter now."""
    try:
        return lora_args(layer)
    except NothingToFuse:
        return None


def _qkv_forward(parent: type, family: Family) -> Callable[..., object]:
    def forward(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
        x = kwargs.get("hidden_states", args[0] if args else None)
        coverage = self._fastlora_qkv_coverage
        try:
            if not isinstance(x, torch.Tensor):
                raise UnsupportedLoRA("no hidden_states tensor")
            layers, qkv = qkv_arguments(self, family)
        except NothingToFuse as e:
            coverage.nothing_to_do(str(e))
            return parent.forward(self, *args, **kwargs)
        except UnsupportedLoRA as e:
            coverage.fallback(str(e))
            return parent.forward(self, *args, **kwargs)
        backend = self._fastlora_backend
        with use_backend(backend) if backend is not None else contextlib.nullcontext():
            outputs = lora_qkv(x, [a.base for a in qkv], [a.A[0] for a in qkv], [a.B[0] for a in qkv],
                               [a.scaling[0] for a in qkv], biases=[a.bias for a in qkv],
                               dropout_p=[a.dropout_p[0] for a in qkv], compute_dtype=qkv[0].compute_dtype)
        lent = {id(layer): (x, y) for layer, y in zip(layers, outputs, strict=True)}
        token = _LENT.set(lent)
        try:
            result = parent.forward(self, *args, **kwargs)
        finally:
            _LENT.reset(token)
        if lent:  # a projection computed its own output (PEFT's adapter_names, a hook that changed its input)
            coverage.fallback("q, k or v was not called on the attention's input alone, so lora_qkv's outputs were "
                              "not used")
        else:
            coverage.hit()
        return result

    return forward


def fast_qkv_class(cls: type, family: Family) -> type:
    """The subclass of a family's attention class whose q, k and v come from one :func:`lora_qkv`.

    Its parent is called through a closure rather than ``_fastlora_original``: another patch (RoPE) may swap the
    class again on top of this one, and reads that attribute for its own parent.
    """
    key = (cls, family)
    if key not in _FAST:
        _FAST[key] = type(f"FastLoRA{cls.__name__}", (cls,), {
            "forward": _qkv_forward(cls, family), "_fastlora_qkv_original": cls, "__module__": __name__,
            "__doc__": cls.__doc__})
    return _FAST[key]
