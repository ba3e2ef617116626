"""What a suite's factory builds: a :class:`Case` (the call to time, its outputs and its :class:`Work`), and
helpers that make the inputs and the forward, backward and full cases of a differentiable function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MODES = ("forward", "backward", "full")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Work:
    """What a call must do at least: bytes it moves to and from memory, and floating-point operations.

    The roofline model bounds a call's time below by ``max(bytes / copy bandwidth, flops / matmul rate)``; the
    larger term names the metric (GB/s or TFLOP/s) and the bound over the measured time is the share.

    Example:
        >>> Work(bytes=3 * 4096 * 4) + Work(bytes=5 * 4096 * 4)
        Work(bytes=131072, flops=0)
    """

    bytes: int = 0
    flops: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(self.bytes + other.bytes, self.flops + other.flops)


@dataclass(frozen=True)
class Case:
    """One provider, mode and shape, ready to run.

    ``fn`` is what is timed. ``outputs`` returns the tensors the gate compares (forward output, then
    gradients); when None, ``fn``'s own return value is used.

    Example:
        >>> x = torch.randn(64, 64)
        >>> case = Case(fn=lambda: x @ x, work=Work(flops=2 * 64**3))
        >>> case.results()[0].shape
        torch.Size([64, 64])
    """

    fn: Callable[[], object]
    work: Work
    outputs: Callable[[], object] | None = None

    def results(self) -> tuple[torch.Tensor, ...]:
        """Run once and return the tensors to check, as a tuple."""
        out = (self.outputs or self.fn)()
        if isinstance(out, torch.Tensor):
            return (out,)
        return tuple(out)  # type: ignore[arg-type]


def as_in_training(fn: Callable[..., object], device: torch.device, dtype: torch.dtype) -> Callable[..., object]:
    """``fn`` under ``torch.autocast(dtype)`` when ``dtype`` is half precision, as HF Trainer's ``bf16=True`` /
    ``fp16=True`` runs a model's forward; ``fn`` itself in fp32.

    It sets the precision of PEFT's LoRA branch: under autocast its fp32 adapters compute in bf16, as fastlora's
    do, while without autocast PEFT computes the branch in fp32. Gated element by element against that fp32 branch,
    the adapters' gradients (sums over every token) fail the bf16 tolerance where they are small (measured on the
    CPU, M 2048, 4096 -> 1024, r 16: 6091 of 65536 dA elements, the same number for PEFT under autocast against
    PEFT without), while fastlora's dA and dB equal PEFT's under autocast bit for bit.

    Example:
        >>> fn = as_in_training(peft_layer, torch.device("cuda"), torch.bfloat16)
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return fn

    def under_autocast(*args: object) -> object:
        with torch.autocast(device.type, dtype=dtype):
            return fn(*args)

    return under_autocast


def randn(shape: Shape, *, device: torch.device, dtype: torch.dtype, seed: int = 0,
          scale: float = 1.0) -> torch.Tensor:
    """Seeded normal inputs made on ``device``: every provider of a case gets the same tensors.

    Example:
        >>> torch.equal(randn((4,), device=torch.device("cpu"), dtype=torch.float32),
        ...             randn((4,), device=torch.device("cpu"), dtype=torch.float32))
        True
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    return out.mul_(scale) if scale != 1.0 else out


def autograd_case(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], inputs: Sequence[torch.Tensor],
                  mode: str, *, forward: Work, backward: Work, requires_grad: Sequence[bool] | None = None,
                  seed: int = 1000) -> Case:
    """The case for ``mode`` of a differentiable ``fn(*inputs)``.

    ``forward`` times one call without autograd recording; ``backward`` times only ``torch.autograd.grad`` of a
    graph built beforehand (kept with ``retain_graph``, so no forward runs inside the timed region); ``full``
    times both. Gradients are
    taken for the inputs marked in ``requires_grad`` (default: all floating ones) against a seeded upstream
    gradient; they are returned, not accumulated into ``.grad``, so no extra add is timed.

    Example:
        >>> cpu = torch.device("cpu")
        >>> gate = randn((256, 1024), device=cpu, dtype=torch.float32, seed=0)
        >>> up = randn((256, 1024), device=cpu, dtype=torch.float32, seed=1)
        >>> case = autograd_case(fastlora.swiglu, [gate, up], "full", forward=Work(bytes=3 * gate.nbytes),
        ...                      backward=Work(bytes=5 * gate.nbytes))
        >>> [t.shape for t in case.results()]  # output, d gate, d up
        [torch.Size([256, 1024]), torch.Size([256, 1024]), torch.Size([256, 1024])]
    """
    if mode not in MODES:
        raise ValueError(f"autograd_case: unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    if mode == "forward":
        # No graph: a module's own parameters (a PEFT layer's adapters) would otherwise make one.
        return Case(fn=lambda: _no_grad(fn, inputs), work=forward)
    flags = requires_grad if requires_grad is not None else [t.is_floating_point() for t in inputs]
    leaves = [t.detach().requires_grad_(bool(f)) for t, f in zip(inputs, flags, strict=True)]
    wrt = [t for t in leaves if t.requires_grad]
    outs = _as_tuple(fn(*leaves))
    grads = tuple(randn(tuple(o.shape), device=o.device, dtype=o.dtype, seed=seed + i) for i, o in enumerate(outs))
    if mode == "backward":
        return _backward_case(outs, wrt, grads, backward)
    return _full_case(fn, leaves, wrt, grads, forward + backward)


def _no_grad(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
             inputs: Sequence[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return fn(*inputs)


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # Ops such as RoPE return several tensors; each gets its own upstream gradient.
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _backward_case(outs: tuple[torch.Tensor, ...], wrt: list[torch.Tensor], grads: tuple[torch.Tensor, ...],
                   work: Work) -> Case:
    return Case(fn=lambda: torch.autograd.grad(outs, wrt, grads, retain_graph=True), work=work)


def _full_case(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], wrt: list[torch.Tensor],
               grads: tuple[torch.Tensor, ...], work: Work) -> Case:
    # Each call builds and consumes its own graph; the one autograd_case built for the gradients' shapes is
    # not captured here, so it is freed before timing.
    def step() -> tuple[torch.Tensor, ...]:
        ys = _as_tuple(fn(*leaves))
        return (*(y.detach() for y in ys), *torch.autograd.grad(ys, wrt, grads))

    return Case(fn=step, work=work)
