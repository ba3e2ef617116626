"""A LoRA gated MLP (SwiGLU): PEFT's three layers and F.silu, the bare GEMMs, fastlora.lora_mlp.

A shape is ``(M, H, I, r, nf4)``: M tokens, hidden H, intermediate I, one rank-r adapter per projection (alpha
2r, fp32 adapters), dense or NF4 bases. Llama-3.1-8B's MLP on a GPU (H 4096, I 14336), a small one on the CPU.
Providers: ``peft`` (the reference: PEFT LoRA layers over ``nn.Linear`` holding the dense, or dequantized,
weights), ``matmuls`` (the floor: the three base GEMMs, and in ``full`` their three dX GEMMs; not gated) and
``fastlora``. Gradients: x and every A and B. In bf16 and fp16 both run their forward under autocast, as HF
Trainer's ``bf16=True`` does (see ``as_in_training``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import fastlora
from fastlora import LoRAProjection

from ..cases import as_in_training
from ..harness import Case, Provider, Shape, Shapes, Suite, Work, autograd_case, randn


class _PeftMLP(torch.nn.Module):
    def __init__(self, gate: torch.nn.Module, up: torch.nn.Module, down: torch.nn.Module):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _peft_mlp(weights: list[torch.Tensor], r: int) -> Callable[..., torch.Tensor]:
    from peft.tuners.lora import Linear, LoraConfig

    layers = []
    for w in weights:
        base = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        base.weight.data = w
        layers.append(Linear(base.requires_grad_(False), "default", LoraConfig(r=r, lora_alpha=2 * r), r=r,
                             lora_alpha=2 * r))
    mlp = _PeftMLP(*layers)

    def fn(x: torch.Tensor, *ab: torch.Tensor) -> torch.Tensor:
        # The adapters come in as inputs (the harness takes their gradients), in gate, up, down order.
        params = {f"{name}.lora_{kind}.default.weight": ab[2 * i + j]
                  for i, name in enumerate(("gate", "up", "down")) for j, kind in enumerate("AB")}
        return torch.func.functional_call(mlp, params, (x,))

    return fn


def _work(m: int, h: int, i: int, r: int, nf4: int, dtype: torch.dtype) -> tuple[Work, Work]:
    size = torch.finfo(dtype).bits // 8
    weight_bytes = 3 * h * i * (size if not nf4 else 0.5)
    base, lora = 2 * m * h * i * 3, 2 * m * r * (h + i) * 3
    return Work(bytes=int(weight_bytes), flops=base + lora), Work(bytes=int(weight_bytes), flops=base + 2 * lora)


def _make(provider: str, mode: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    m, h, i, r, nf4 = shape
    x = randn((m, h), device=device, dtype=dtype, seed=0)
    dims = [(i, h), (i, h), (h, i)]
    weights = [randn(d, device=device, dtype=dtype, seed=1 + j, scale=d[1] ** -0.5) for j, d in enumerate(dims)]
    packed = [fastlora.quantize_nf4(w) for w in weights] if nf4 else None
    dense = [fastlora.dequantize_nf4(p, dtype=dtype) for p in packed] if nf4 else weights
    adapters = [(randn((r, d[1]), device=device, dtype=torch.float32, seed=10 + j, scale=d[1] ** -0.5),
                 randn((d[0], r), device=device, dtype=torch.float32, seed=20 + j, scale=r ** -0.5))
                for j, d in enumerate(dims)]
    forward, backward = _work(m, h, i, r, nf4, dtype)
    if provider == "matmuls":
        dy, dg = randn((m, h), device=device, dtype=dtype, seed=4), randn((m, i), device=device, dtype=dtype, seed=5)
        wg, wu, wd = dense

        def floor() -> tuple[torch.Tensor, ...]:
            outs = (x @ wg.t(), x @ wu.t(), dg @ wd.t())
            return outs if mode == "forward" else (*outs, dg @ wg, dg @ wu, dy @ wd)

        return Case(fn=floor, work=forward if mode == "forward" else forward + backward)
    if provider == "peft":
        fn = _peft_mlp(dense, r)
    elif provider == "fastlora":
        bases = packed if nf4 else dense

        def fn(x: torch.Tensor, *ab: torch.Tensor) -> torch.Tensor:
            p = [LoRAProjection(bases[j], ab[2 * j], ab[2 * j + 1], 2.0) for j in range(3)]
            return fastlora.lora_mlp(x, p[:2], p[2])
    else:
        raise ValueError(f"lora_mlp: unknown provider {provider!r}")
    inputs = [x, *[t for pair in adapters for t in pair]]
    return autograd_case(as_in_training(fn, device, dtype), inputs, mode, forward=forward, backward=backward)


SUITE = Suite(
    name="lora_mlp",
    description="LoRA SwiGLU MLP (M tokens, hidden H, intermediate I, rank r per projection); grads x, A, B",
    providers=(
        Provider("peft", "reference"),
        Provider("matmuls", "floor"),
        Provider("fastlora", "fastlora"),
    ),
    modes=("forward", "full"),
    shapes=Shapes(gpu=((8192, 4096, 14336, 16, 0), (8192, 4096, 14336, 16, 1), (2048, 4096, 14336, 16, 1)),
                  cpu=((256, 512, 1408, 16, 0), (256, 512, 1408, 16, 1)), cpu_quick=((16, 64, 96, 8, 1),)),
    make=_make,
    label=lambda s: "M{} H{} I{} r{} {}".format(*s[:4], "nf4" if s[4] else "dense"),
    reference="peft",
    # The adapters' gradients sum over every token and reach 1e3 here: their fp32 rounding is about 1e-3, for
    # PEFT and fastlora alike (both measured against fp64), above the default absolute floor of 1e-5.
    # In half precision both round the activation h to bf16/fp16 before the down projection (PEFT after its silu,
    # fastlora after its fused glu, at different points), which moves each output by a share of eps * rms(output)
    # (see gate.compare): measured on the CPU (M 512-1024, H 256-512, I 512-1408), fastlora and PEFT under autocast
    # differ by at most 15 eps * rms in bf16 (0.058 rms; PEFT's own error against fp64 is 0.05 rms) and 18 eps * rms
    # in fp16, on the output and on every gradient; 14% of the output's elements fail the plain bf16 tolerance.
    # 32 eps * rms leaves twice that.
    tolerance={torch.float32: (1e-4, 5e-3), torch.bfloat16: (1.6e-2, 1e-2, 32 * 2.0**-8),
               torch.float16: (2e-3, 1e-3, 32 * 2.0**-11)},
)
