"""SwiGLU, ``silu(gate) * up`` over ``tokens x intermediate``: eager and compiled torch against fastlora.

Providers: ``torch`` (the fp32 reference with autograd: the gate's oracle), ``compile`` (torch.compile of the
reference), ``fastlora`` (backend chosen by the dispatcher), and one per explicit backend: ``fastlora-cpp``
(CPU) and ``fastlora-triton`` (GPU). Work: the bytes the op must move, 3 elements per position forward (read
gate and up, write out) and 5 backward (read grad, gate, up; write both gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

import fastlora
from fastlora.ops import swiglu_reference

from ..harness import Case, Provider, Shape, Shapes, Suite, Unavailable, Work, autograd_case, randn

_EXPLICIT = {"fastlora-cpp": "cpp", "fastlora-triton": "triton"}


@functools.cache
def _compiled() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    # One compiled function for the whole process: dynamo keys its cache on it, so later shapes and modes
    # reuse or extend what earlier cases compiled instead of starting over.
    return torch.compile(swiglu_reference)


def _implementation(provider: str, device: torch.device,
                    dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if provider == "torch":
        return swiglu_reference
    if provider == "compile":
        return _compiled()
    if provider == "fastlora":
        return fastlora.swiglu
    backend = _EXPLICIT.get(provider)
    if backend is None:
        raise ValueError(f"swiglu: unknown provider {provider!r}")
    if backend == "triton" and device.type == "cpu":
        raise Unavailable("Triton runs on the CPU only in its interpreter, which is for tests, not timing")
    try:
        fastlora.resolve_backend("swiglu", device, dtype, backend)
    except fastlora.BackendUnavailableError as e:
        raise Unavailable(str(e)) from None
    return functools.partial(fastlora.swiglu, backend=backend)


def _make(provider: str, mode: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    fn = _implementation(provider, device, dtype)
    gate = randn(shape, device=device, dtype=dtype, seed=0)
    up = randn(shape, device=device, dtype=dtype, seed=1)
    size = gate.nbytes
    return autograd_case(fn, [gate, up], mode, forward=Work(bytes=3 * size), backward=Work(bytes=5 * size))


SUITE = Suite(
    name="swiglu",
    description="silu(gate) * up over tokens x intermediate",
    providers=(
        Provider("torch", "reference"),
        Provider("compile", "baseline", compiled=True),
        Provider("fastlora", "fastlora"),
        Provider("fastlora-cpp", "fastlora"),
        Provider("fastlora-triton", "fastlora"),
    ),
    modes=("forward", "backward", "full"),
    # Llama-3-8B's MLP (intermediate 14336) at 8K tokens, and Llama-2-7B's (11008) at 4K.
    shapes=Shapes(gpu=((8192, 14336), (4096, 11008)), cpu=((2048, 4096),), cpu_quick=((256, 1024),)),
    make=_make,
)
