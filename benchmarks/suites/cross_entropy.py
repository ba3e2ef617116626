"""Cross-entropy on logits, and the fused linear cross-entropy that never makes them: torch, compile, Liger,
fastlora.

``cross_entropy``: a shape is ``(N, V)`` tokens x vocabulary, labels already shifted, 1 in 8 ignored. The
reference is what transformers' causal-LM loss does (upcast the logits to fp32, then F.cross_entropy).

``fused_linear_cross_entropy``: a shape is ``(N, H, V, train_head)``; ``train_head`` 0 is the LoRA case (a frozen
lm_head: gradient for the hidden states only), 1 also takes the head's gradient. The reference is the unfused
``F.linear`` then the same loss. ``matmuls`` is the floor of the TARGETS bar: the bare GEMMs the loss cannot do
without (the logits, dX and, with a trainable head, dW), not gated since it computes no loss; its memory is
the unfused one, not a floor.

Both time ``forward`` (no gradient wanted) and ``full`` (loss and gradients). There is no ``backward`` mode:
the fused providers compute their gradients in the forward, so a backward timed alone would compare a scaling
with the whole unfused backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

import fastlora

from ..harness import Case, Provider, Shape, Shapes, Suite, Unavailable, Work, autograd_case, randn


def _labels(n: int, vocab: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(7)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    labels[::8] = -100
    return labels


def _hf_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100)


def _linear_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _hf_loss(torch.nn.functional.linear(hidden, weight), labels)


@functools.cache
def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return torch.compile(fn)


def _liger(name: str, device: torch.device) -> torch.nn.Module:
    try:
        from liger_kernel.transformers import cross_entropy as liger_ce
        from liger_kernel.transformers import fused_linear_cross_entropy as liger_flce
    except Exception as e:  # not installed, or no GPU for its Triton kernels
        raise Unavailable(f"Liger-Kernel cannot be imported: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") \
            from None
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel's cross-entropy runs on CUDA only")
    if name == "cross_entropy":
        return liger_ce.LigerCrossEntropyLoss(ignore_index=-100)
    return liger_flce.LigerFusedLinearCrossEntropyLoss(ignore_index=-100)


def _triton_only(device: torch.device) -> None:
    if device.type == "cpu":
        raise Unavailable("Triton runs on the CPU only in its interpreter, which is for tests, not timing")


def _make_ce(provider: str, mode: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    n, vocab = shape
    logits = randn((n, vocab), device=device, dtype=dtype, seed=0, scale=2.0)
    labels = _labels(n, vocab, device)
    if provider == "torch":
        fn = _hf_loss
    elif provider == "compile":
        fn = _compiled(_hf_loss)
    elif provider == "liger":
        module = _liger("cross_entropy", device)
        fn = lambda x, y: module(x, y)  # noqa: E731
    elif provider in ("fastlora", "fastlora-triton"):
        if provider == "fastlora-triton":
            _triton_only(device)
        backend = "triton" if provider == "fastlora-triton" else "auto"
        fn = lambda x, y: fastlora.cross_entropy(x, y, backend=backend)  # noqa: E731
    else:
        raise ValueError(f"cross_entropy: unknown provider {provider!r}")
    # At least: read the logits once; write their gradient once.
    return autograd_case(fn, [logits, labels], mode, forward=Work(bytes=logits.nbytes),
                         backward=Work(bytes=logits.nbytes))


def _floor(hidden: torch.Tensor, weight: torch.Tensor, gemms: int) -> tuple[torch.Tensor, ...]:
    """The GEMMs alone, with no autograd: the logits, then dX and dW with the logits standing in for their
    gradient (same shape and dtype)."""
    logits = hidden @ weight.t()
    outputs = [logits]
    if gemms > 1:
        outputs.append(logits @ weight)
    if gemms > 2:
        outputs.append(logits.t() @ hidden)
    return tuple(outputs)


def _make_flce(provider: str, mode: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    n, h, vocab, train_head = shape
    hidden = randn((n, h), device=device, dtype=dtype, seed=0)
    weight = randn((vocab, h), device=device, dtype=dtype, seed=1, scale=h**-0.5)
    labels = _labels(n, vocab, device)
    if provider == "torch":
        fn = _linear_loss
    elif provider == "compile":
        fn = _compiled(_linear_loss)
    elif provider == "liger":
        module = _liger("fused_linear_cross_entropy", device)
        fn = lambda x, w, y: module(w, x, y)  # noqa: E731
    elif provider == "matmuls":
        work = _flce_work(n, h, vocab, train_head, mode)
        return Case(fn=lambda: _floor(hidden, weight, work.flops // (2 * n * h * vocab)), work=work)
    elif provider in ("fastlora", "fastlora-triton"):
        if provider == "fastlora-triton":
            _triton_only(device)
        backend = "triton" if provider == "fastlora-triton" else "auto"
        fn = lambda x, w, y: fastlora.fused_linear_cross_entropy(x, w, y, backend=backend)  # noqa: E731
    else:
        raise ValueError(f"fused_linear_cross_entropy: unknown provider {provider!r}")
    return autograd_case(fn, [hidden, weight, labels], mode, forward=_flce_work(n, h, vocab, train_head, mode),
                         backward=Work(), requires_grad=[True, bool(train_head), False])


def _flce_work(n: int, h: int, vocab: int, train_head: int, mode: str) -> Work:
    gemms = 1 if mode == "forward" else 2 + train_head
    return Work(flops=2 * n * h * vocab * gemms)


CE_SUITE = Suite(
    name="cross_entropy",
    description="cross-entropy on [N, V] logits (N tokens, V vocabulary), 1 in 8 labels ignored",
    providers=(
        Provider("torch", "reference"),
        Provider("compile", "baseline", compiled=True),
        Provider("liger", "baseline"),
        Provider("fastlora", "fastlora"),
        Provider("fastlora-triton", "fastlora"),
    ),
    modes=("forward", "full"),
    shapes=Shapes(gpu=((8192, 128256), (8192, 50257)), cpu=((1024, 32000),), cpu_quick=((64, 1001),)),
    make=_make_ce,
    label=lambda shape: "N{}xV{}".format(*shape),
)

FLCE_SUITE = Suite(
    name="fused_linear_cross_entropy",
    description="loss of hidden [N, H] through an lm_head [V, H]; frozen head (0) or trainable (1)",
    providers=(
        Provider("torch", "reference"),
        Provider("compile", "baseline", compiled=True),
        Provider("liger", "baseline"),
        Provider("matmuls", "floor"),
        Provider("fastlora", "fastlora"),
        Provider("fastlora-triton", "fastlora"),
    ),
    modes=("forward", "full"),
    shapes=Shapes(gpu=((8192, 4096, 128256, 0), (8192, 4096, 128256, 1)),
                  cpu=((512, 512, 16000, 0), (512, 512, 16000, 1)), cpu_quick=((64, 64, 1001, 0),)),
    make=_make_flce,
    label=lambda shape: "N{}xH{}xV{} {}".format(*shape[:3], "trainable head" if shape[3] else "frozen head"),
)
