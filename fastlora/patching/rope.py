"""The RoPE patch: transformers' ``apply_rotary_pos_emb`` replaced by :func:`fastlora.apply_rope`, per instance.

transformers' attention looks ``apply_rotary_pos_emb`` up as a module global at call time, so a per-instance
patch needs two parts: the global becomes, once per family module, a trampoline that calls the original
unless a context variable says the calling model is patched; and each patched model's attention modules get a
subclass (``__class__`` swapped) whose forward sets that variable. Unpatched models keep the original function;
undo swaps the classes back (the trampoline stays, passing through).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
from collections.abc import Callable

import torch

from .. import tuning
from ..dispatch import Backend, is_auto, resolve_backend, use_backend
from ..ops.rope import apply_rope
from ..tuning import measured_variant
from .coverage import Coverage

# The calling attention's call counter while a patched attention runs, else None.
_ACTIVE: contextvars.ContextVar[Coverage | None] = contextvars.ContextVar("fastlora_rope", default=None)
_FAST: dict[type, type] = {}


def _trampoline(original: Callable[..., object]) -> Callable[..., object]:
    names = list(inspect.signature(original).parameters)
    # Older families take position_ids (unused) before unsqueeze_dim.
    unsqueeze_at = names.index("unsqueeze_dim") - 4 if "unsqueeze_dim" in names else None

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        coverage = _ACTIVE.get()
        if coverage is None:
            return original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = kwargs.get("unsqueeze_dim", 1)
        if unsqueeze_at is not None and len(args) > unsqueeze_at:
            unsqueeze_dim = args[unsqueeze_at]
        if _variant(original, q, k, cos, sin, unsqueeze_dim, args, kwargs) == TRANSFORMERS:
            coverage.chose_original("transformers' function measured faster here (fastlora.tuning)")
            return original(q, k, cos, sin, *args, **kwargs)
        coverage.hit()
        return apply_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb._fastlora_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


#: RoPE's two ways: fastlora's apply_rope, or the family's own function.
FASTLORA, TRANSFORMERS = "fastlora", "transformers"


def _variant(original: Callable[..., object], q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, unsqueeze_dim: int, args: tuple, kwargs: dict) -> str:
    """fastlora's or transformers' RoPE for this call: measured once per shape (forward and backward when training)
    where tuning is on; else fastlora's where a kernel serves it, transformers' where only the reference would."""
    def run(variant: str, grad: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad() if grad is not None else contextlib.nullcontext():
            qq, kk = (t.detach().requires_grad_(grad is not None) for t in (q, k))
            if variant == FASTLORA:
                out = apply_rope(qq, kk, cos, sin, unsqueeze_dim=unsqueeze_dim)
            else:
                out = original(qq, kk, cos, sin, *args, **kwargs)
            if grad is None:
                return tuple(out)
            return (*(t.detach() for t in out), *torch.autograd.grad(out, (qq, kk), [grad(t) for t in out]))

    def options() -> list[str]:
        if not is_auto("rope"):  # a backend asked for: fastlora's RoPE on it, as asked
            return [FASTLORA]
        kernel = resolve_backend("rope", q.device, q.dtype)[0] is not Backend.TORCH
        return [FASTLORA, TRANSFORMERS] if kernel else [TRANSFORMERS, FASTLORA]

    train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    shape = (tuple(q.shape), k.shape[1], tuple(cos.shape), unsqueeze_dim)
    # q[0, 0] ([S, D], a view) stands for the call's rows, device and dtype.
    return measured_variant("rope", q[0, 0], shape, options, run, train)


def install_trampoline(modeling: str) -> None:
    """Replace ``<modeling>.apply_rotary_pos_emb`` by the trampoline (once; it passes through when inactive)."""
    module = importlib.import_module(modeling)
    current = module.apply_rotary_pos_emb
    if not hasattr(current, "_fastlora_original"):
        module.apply_rotary_pos_emb = _trampoline(current)


def _forward(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
    token = _ACTIVE.set(self._fastlora_rope_coverage)
    try:
        backend = self._fastlora_rope_backend
        with use_backend(rope=backend) if backend else contextlib.nullcontext():
            return type(self)._fastlora_original.forward(self, *args, **kwargs)
    finally:
        _ACTIVE.reset(token)


def fast_attention_class(cls: type) -> type:
    """The subclass of an attention class whose forward rotates q and k with fastlora."""
    if cls not in _FAST:
        _FAST[cls] = type(f"FastLoRA{cls.__name__}", (cls,), {
            "forward": _forward, "_fastlora_original": cls, "__module__": __name__, "__doc__": cls.__doc__})
    return _FAST[cls]


def rope_worth_it(device: torch.device, dtype: torch.dtype, backend: Backend | str | None) -> str | None:
    """Why not to patch RoPE here (None: patch it). With tuning on, each call measures fastlora's RoPE against
    transformers' function; with ``FASTLORA_TUNE=0`` and no backend asked for, RoPE is left alone where only the
    reference would replace transformers' function (slower on a CPU: 0.64-0.84x in the CPU benchmark)."""
    if backend is not None or tuning.enabled():
        return None
    chosen, _ = resolve_backend("rope", device, dtype)
    if chosen is Backend.TORCH:
        return f"on {device.type} only the PyTorch reference would run, slower than transformers' own function"
    return None
