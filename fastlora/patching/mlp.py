"""The MLP patch: a family's gated MLP on :func:`fastlora.lora_mlp` when its projections are plain LoRA layers.

Per instance, by swapping the MLP module's class; the subclass's forward checks on every call that gate/up and
down are still each one plain adapter (PEFT state can change) and otherwise runs the original forward, which
then goes through the patched (or PEFT's) LoRA layers one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..dispatch import use_backend
from ..ops.lora_mlp import LoRAProjection, lora_mlp
from ..tuning import measured_variant
from .coverage import paused as coverage_paused
from .families import Family
from .peft_lora import NothingToFuse, UnsupportedLoRA, lora_args

_FAST: dict[tuple[type, Family, str], type] = {}
#: transformers' activation names -> lora_mlp's.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu"}


def projection(layer: torch.nn.Module) -> tuple[LoRAProjection, torch.dtype | None]:
    """One plain-LoRA projection for :func:`lora_mlp`, and its compute dtype; UnsupportedLoRA otherwise."""
    if not hasattr(layer, "lora_A"):
        raise UnsupportedLoRA(f"{type(layer).__name__} has no LoRA adapter")
    a = lora_args(layer)  # NothingToFuse when no adapter is active
    if len(a.A) != 1:
        raise UnsupportedLoRA(f"{len(a.A)} active adapters (the fused MLP takes one per projection)")
    if a.lora_bias[0] is not None:
        raise UnsupportedLoRA("lora_bias on an MLP projection")
    return LoRAProjection(a.base, a.A[0], a.B[0], a.scaling[0], a.bias, a.dropout_p[0]), a.compute_dtype


def projections(mlp: torch.nn.Module, family: Family) -> tuple[list[LoRAProjection], LoRAProjection,
                                                                torch.dtype | None]:
    """(gate_up, down, compute dtype) of a family's MLP module, or UnsupportedLoRA with the reason."""
    layers = [getattr(mlp, name) for name in (*family.gate_up, family.down)]
    try:
        done = [projection(layer) for layer in layers]
    except NothingToFuse as e:
        idle = []
        for layer in layers:
            try:
                projection(layer)
            except NothingToFuse:
                idle.append(layer)
        if len(idle) == len(layers):
            raise
        raise UnsupportedLoRA(f"some projections have no active adapter ({e})") from None
    return [p for p, _ in done[:-1]], done[-1][0], done[0][1]


#: The MLP's two ways: one fused lora_mlp, or the original forward through the (patched) layers one by one.
FUSED, LAYERS = "fused", "layers"


def _forward(self: torch.nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    cls = type(self)
    coverage = self._fastlora_coverage
    if args or kwargs:
        coverage.fallback(f"called with {', '.join(kwargs) or 'extra positional arguments'}")
        return cls._fastlora_original.forward(self, x, *args, **kwargs)
    try:
        gate_up, down, compute_dtype = projections(self, cls._fastlora_family)
    except NothingToFuse as e:
        coverage.nothing_to_do(str(e))
        return cls._fastlora_original.forward(self, x)
    except UnsupportedLoRA as e:
        coverage.fallback(str(e))
        return cls._fastlora_original.forward(self, x)
    backend = self._fastlora_backend
    if backend is None and _variant(self, x, gate_up, down, compute_dtype) == LAYERS:
        coverage.chose_original("the layers one by one measured faster here (fastlora.tuning)")
        return cls._fastlora_original.forward(self, x)
    coverage.hit()
    with use_backend(backend) if backend else contextlib.nullcontext():
        return lora_mlp(x, gate_up, down, activation=cls._fastlora_activation, compute_dtype=compute_dtype)


def _variant(mlp: torch.nn.Module, x: torch.Tensor, gate_up: list[LoRAProjection], down: LoRAProjection,
             compute_dtype: torch.dtype | None) -> str:
    """Fused or layer by layer for this call: measured once per shape (forward and backward when training) where
    tuning is on; else fused, except on a CPU (measured once, fp32: 0.86-0.93x the layers for a full step)."""
    cls = type(mlp)
    params = [t for p in (*gate_up, down) for t in (p.A, p.B) if t.requires_grad]
    train = torch.is_grad_enabled() and (x.requires_grad or bool(params))

    def run(variant: str, grad: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad() if grad is not None else contextlib.nullcontext():
            xx = x.detach().requires_grad_(grad is not None)
            if variant == FUSED:
                y = lora_mlp(xx, gate_up, down, activation=cls._fastlora_activation, compute_dtype=compute_dtype)
            else:
                with coverage_paused():
                    y = cls._fastlora_original.forward(mlp, xx)
            if grad is None:
                return (y,)
            return (y.detach(), *torch.autograd.grad(y, [xx, *params], grad(y)))

    options = [LAYERS, FUSED] if x.device.type == "cpu" else [FUSED, LAYERS]
    shape = (type(down.base), *down.base.shape, *((p.A.shape[0], p.A.dtype) for p in (*gate_up, down)))
    return measured_variant("lora_mlp", x.reshape(-1, x.shape[-1]), shape, lambda: options, run, train)


def fast_mlp_class(cls: type, family: Family, activation: str) -> type:
    """The subclass of a family's MLP class whose forward is :func:`lora_mlp`."""
    key = (cls, family, activation)
    if key not in _FAST:
        _FAST[key] = type(f"FastLoRA{cls.__name__}", (cls,), {
            "forward": _forward, "_fastlora_original": cls, "_fastlora_family": family,
            "_fastlora_activation": activation, "__module__": __name__, "__doc__": cls.__doc__})
    return _FAST[key]
