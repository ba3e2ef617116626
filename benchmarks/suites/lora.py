"""LoRA linear layers over a frozen base: PEFT, PEFT over bitsandbytes, the bare base GEMMs, fastlora.

A shape is ``(M, K, N, r, nf4)``: M tokens through a ``K -> N`` projection with one rank-r adapter (alpha = 2r,
no dropout, fp32 adapters as PEFT keeps them), over a dense base (``nf4`` 0) or an NF4 one (1, blocksize 64,
double quantized). On a GPU: Llama-3.1-8B's gate/up projection (4096 -> 14336) at M = 1, 256, 2048, 8192 and
r = 16 and 64, and its other projections at M = 8192; small ones on the CPU.

Providers: ``peft`` (PEFT's LoRA ``Linear`` over an ``nn.Linear`` holding the dense weight, the NF4 one
dequantized: the gate's reference), ``peft-bnb`` (PEFT's ``Linear4bit`` over bitsandbytes, NF4 shapes, where
bitsandbytes is installed), ``matmuls`` (the floor of the TARGETS bars: the base GEMMs alone in the compute dtype,
``X W^T`` and in ``full`` also ``dY W``; not gated), ``fastlora`` (``lora_linear``: for M <= 256 over NF4 on a
GPU, the kernel that reads NF4 inside the GEMM) and ``fastlora-dequant`` (NF4 shapes: ``lora_linear`` made to
dequantize once then use cuBLAS, the baseline of the small-M bar). Gradients: x, A and B. In bf16 and fp16 the
gated providers run their forward under autocast, as HF Trainer's ``bf16=True`` does (see ``as_in_training``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import fastlora
from fastlora import NF4Weight

from ..cases import as_in_training
from ..harness import Case, Provider, Shape, Shapes, Suite, Unavailable, Work, autograd_case, randn


def _peft_layer(base: torch.nn.Module, r: int, a: torch.Tensor, b: torch.Tensor, four_bit: bool) -> torch.nn.Module:
    from peft.tuners.lora import Linear, LoraConfig

    config = LoraConfig(r=r, lora_alpha=2 * r)
    if four_bit:
        from peft.tuners.lora import Linear4bit as cls
    else:
        cls = Linear
    layer = cls(base, "default", config, r=r, lora_alpha=2 * r)
    layer.lora_A["default"].weight.data = a.detach().clone()
    layer.lora_B["default"].weight.data = b.detach().clone()
    return layer


def _bnb_linear(w: NF4Weight, dtype: torch.dtype) -> torch.nn.Module:
    try:
        import bitsandbytes as bnb
    except Exception as e:
        raise Unavailable(f"bitsandbytes cannot be imported: {type(e).__name__}") from None
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight = w.to_bnb()
    return layer.to(w.device)


def _call(layer: torch.nn.Module) -> Callable[..., torch.Tensor]:
    def fn(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        params = {"lora_A.default.weight": a, "lora_B.default.weight": b}
        return torch.func.functional_call(layer, params, (x,))

    return fn


def _work(m: int, k: int, n: int, r: int, nf4: int, dtype: torch.dtype) -> tuple[Work, Work]:
    """(forward, backward): the base GEMM, the adapters' thin ones, the weight and the activations once each."""
    size = torch.finfo(dtype).bits // 8
    weight_bytes = n * k // 2 if nf4 else n * k * size
    moved = weight_bytes + m * (k + n) * size
    base, lora = 2 * m * k * n, 2 * m * r * (k + n)
    # Backward: dX = dY W, and three thin GEMMs (dY B, dB, dA) for the forward's two.
    return Work(bytes=moved, flops=base + lora), Work(bytes=moved, flops=base + 3 * lora // 2)


def _make(provider: str, mode: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    m, k, n, r, nf4 = shape
    x = randn((m, k), device=device, dtype=dtype, seed=0)
    weight = randn((n, k), device=device, dtype=dtype, seed=1, scale=k**-0.5)
    a = randn((r, k), device=device, dtype=torch.float32, seed=2, scale=k**-0.5)
    b = randn((n, r), device=device, dtype=torch.float32, seed=3, scale=r**-0.5)
    scaling = 2.0
    packed = fastlora.quantize_nf4(weight) if nf4 else None
    dense = fastlora.dequantize_nf4(packed, dtype=dtype) if nf4 else weight
    forward, backward = _work(m, k, n, r, nf4, dtype)
    if provider == "matmuls":
        dy = randn((m, n), device=device, dtype=dtype, seed=4)
        if mode == "forward":
            return Case(fn=lambda: x @ dense.t(), work=forward)
        return Case(fn=lambda: (x @ dense.t(), dy @ dense), work=forward + backward)
    if provider == "peft":
        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype).requires_grad_(False)
        base.weight.data = dense
        fn = _call(_peft_layer(base, r, a, b, False))
    elif provider == "peft-bnb":
        if not nf4:
            raise Unavailable("a dense base has no bitsandbytes layer")
        fn = _call(_peft_layer(_bnb_linear(packed, dtype), r, a, b, True))
    elif provider in ("fastlora", "fastlora-dequant"):
        if provider == "fastlora-dequant" and not nf4:
            raise Unavailable("a dense base has nothing to dequantize")
        base = packed if nf4 else dense
        # fastlora-dequant: never the NF4-reading kernel, always dequantize once then cuBLAS (the small-M bar's
        # baseline); above SMALL_M rows both are the same path.
        backend = "torch" if provider == "fastlora-dequant" else "auto"

        def fn(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            with fastlora.use_backend(nf4_matmul=backend):
                return fastlora.lora_linear(x, base, a, b, scaling)
    else:
        raise ValueError(f"lora: unknown provider {provider!r}")
    return autograd_case(as_in_training(fn, device, dtype), [x, a, b], mode, forward=forward, backward=backward)


def _label(shape: Shape) -> str:
    m, k, n, r, nf4 = shape
    return f"M{m} {k}->{n} r{r} {'nf4' if nf4 else 'dense'}"


_GATE_UP = [(m, 4096, 14336, 16, q) for q in (1, 0) for m in (1, 256, 2048, 8192)]
_OTHERS = [(8192, 4096, 4096, 16, 1), (8192, 4096, 1024, 16, 1), (8192, 14336, 4096, 16, 1), (2048, 4096, 14336, 64, 1)]

SUITE = Suite(
    name="lora",
    description="LoRA linear (M tokens, K -> N, rank r) over a dense or NF4 base; gradients for x, A, B",
    providers=(
        Provider("peft", "reference"),
        Provider("peft-bnb", "baseline"),
        Provider("matmuls", "floor"),
        Provider("fastlora", "fastlora"),
        Provider("fastlora-dequant", "fastlora"),
    ),
    modes=("forward", "full"),
    shapes=Shapes(gpu=tuple(_GATE_UP + _OTHERS),
                  cpu=((256, 1024, 2048, 16, 0), (256, 1024, 2048, 16, 1), (1, 1024, 2048, 16, 1)),
                  cpu_quick=((16, 64, 48, 8, 0), (16, 64, 48, 8, 1))),
    make=_make,
    label=_label,
    reference="peft",
)
