"""RoPE of q and k, ``[B, H, S, D]`` transposed views as HF hands them: transformers, torch.compile, Liger, fastlora.

A shape is ``(B, S, Hq, Hk, D)``: on a GPU the targets' B=4, S=4096, 32 q / 8 kv heads, D=128; smaller on the
CPU. Providers: ``torch`` (transformers' ``apply_rotary_pos_emb``, eager: what fastlora replaces and the gate's
reference), ``compile`` (torch.compile of it), ``liger`` (Liger-Kernel's RoPE, where installed), ``fastlora``,
``fastlora-inplace`` (forward only: it rotates its inputs) and ``fastlora-triton`` (GPU). Work: q and k read and
written once per direction; cos and sin are a few percent on top and counted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

import fastlora

from ..harness import Case, Provider, Shape, Shapes, Suite, Unavailable, Work, autograd_case, randn

RopeFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _hf_apply() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


@functools.cache
def _compiled() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return torch.compile(_hf_apply())


def _liger(cos: torch.Tensor, sin: torch.Tensor) -> RopeFn:
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception as e:  # not installed, or no GPU for its Triton kernels
        raise Unavailable(f"Liger-Kernel cannot be imported: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") \
            from None
    if cos.device.type != "cuda":
        raise Unavailable("Liger-Kernel's RoPE runs on CUDA only")
    return lambda q, k: liger_rotary_pos_emb(q, k, cos, sin)


def _implementation(provider: str, cos: torch.Tensor, sin: torch.Tensor, mode: str) -> RopeFn:
    if provider == "torch":
        return lambda q, k: _hf_apply()(q, k, cos, sin)
    if provider == "compile":
        return lambda q, k: _compiled()(q, k, cos, sin)
    if provider == "liger":
        return _liger(cos, sin)
    if provider == "fastlora":
        return lambda q, k: fastlora.apply_rope(q, k, cos, sin)
    if provider == "fastlora-inplace":
        if mode != "forward":
            raise Unavailable("in place rotates its own inputs: timed in the forward only")
        return lambda q, k: fastlora.apply_rope(q, k, cos, sin, inplace=True)
    if provider == "fastlora-triton":
        if cos.device.type == "cpu":
            raise Unavailable("Triton runs on the CPU only in its interpreter, which is for tests, not timing")
        return lambda q, k: fastlora.apply_rope(q, k, cos, sin, backend="triton")
    raise ValueError(f"rope: unknown provider {provider!r}")


def _make(provider: str, mode: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    b, s, hq, hk, d = shape
    # The projections' outputs viewed as [B, S, H, D] and transposed, exactly as Llama's attention does.
    q = randn((b, s, hq, d), device=device, dtype=dtype, seed=0).transpose(1, 2)
    k = randn((b, s, hk, d), device=device, dtype=dtype, seed=1).transpose(1, 2)
    angles = randn((1, s, d // 2), device=device, dtype=torch.float32, seed=2)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    fn = _implementation(provider, cos, sin, mode)
    moved = 2 * (q.nbytes + k.nbytes) + 2 * cos.nbytes
    return autograd_case(fn, [q, k], mode, forward=Work(bytes=moved), backward=Work(bytes=moved))


SUITE = Suite(
    name="rope",
    description="RoPE of q and k (B, S, Hq, Hk, D), HF's transposed views",
    providers=(
        Provider("torch", "reference"),
        Provider("compile", "baseline", compiled=True),
        Provider("liger", "baseline"),
        Provider("fastlora", "fastlora"),
        Provider("fastlora-inplace", "fastlora"),
        Provider("fastlora-triton", "fastlora"),
    ),
    modes=("forward", "backward", "full"),
    shapes=Shapes(gpu=((4, 4096, 32, 8, 128),), cpu=((1, 1024, 32, 8, 128),), cpu_quick=((1, 128, 8, 2, 64),)),
    make=_make,
    label=lambda shape: "B{}xS{} {}q/{}kv D{}".format(*shape),
)
