"""Helpers for testing kernels against their references, and simulated devices for the dispatcher.

Used by fastlora's own tests and meant for anyone adding an op: the tolerance rule of DESIGN.md in one place.
"""

from __future__ import annotations

import torch

from .device import DeviceInfo

_VERSIONS = {"torch": torch.__version__, "triton": "3.6.0", "cuda": "12.8", "hip": None}


def _gpu(name: str, capability: tuple[int, int], *, vendor: str = "nvidia", arch: str | None = None,
         memory_gib: int = 80) -> DeviceInfo:
    if vendor == "nvidia":
        arch = arch or f"sm_{capability[0]}{capability[1]}"
        bf16 = tf32 = capability >= (8, 0)
    else:
        bf16, tf32 = True, False
    return DeviceInfo(
        vendor=vendor, device_type="cuda", index=0, name=name, capability=capability, arch=arch,
        total_memory=memory_gib << 30, free_memory=memory_gib << 30, bf16=bf16, tf32=tf32,
        compute_dtype=torch.bfloat16 if bf16 else torch.float16, triton_importable=True, triton_usable=True,
        triton_reason=f"simulated triton with its {vendor} backend", versions=dict(_VERSIONS),
    )


#: The machines the dispatcher tests simulate (what ``device_info`` reports on each).
SIMULATED_DEVICES: dict[str, DeviceInfo] = {
    "h100": _gpu("NVIDIA H100 80GB HBM3", (9, 0)),
    "a100": _gpu("NVIDIA A100-SXM4-80GB", (8, 0)),
    "t4": _gpu("Tesla T4", (7, 5), memory_gib=16),
    "v100": _gpu("Tesla V100-SXM2-32GB", (7, 0), memory_gib=32),
    "mi300x": _gpu("AMD Instinct MI300X", (9, 4), vendor="amd", arch="gfx942", memory_gib=192),
    "cpu": DeviceInfo(
        vendor="cpu", device_type="cpu", index=None, name="Simulated x86-64", arch="AVX2", total_memory=24 << 30,
        free_memory=20 << 30, compute_dtype=torch.float32, triton_importable=True, triton_usable=False,
        triton_reason="Triton has no CPU backend", versions=dict(_VERSIONS), cpu_features=frozenset({"avx2"}),
    ),
}


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor, torch_lowp: torch.Tensor | None = None,
                              *, ulps: float = 1.0, atol: float = 1e-6, name: str = "output") -> None:
    """Check a kernel's output with the tolerance rule of DESIGN.md.

    The kernel's error against the fp32 ``reference`` may be at most twice the error of PyTorch's own
    computation in the same low precision (``torch_lowp``), plus a floor of ``ulps`` units in the last place of
    ``actual``'s dtype (stores may truncate in the Triton interpreter) and ``atol``.

    Args:
        actual: the kernel's output, any dtype.
        reference: the fp32 (or fp64) reference, same shape.
        torch_lowp: PyTorch's result computed in ``actual``'s dtype; None counts its error as zero.

    Example:
        >>> assert_close_to_reference(fastlora.swiglu(g, u), ref_fp32, F.silu(g) * u)
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    ref = reference.double()
    got = actual.double()
    if not torch.isfinite(got).all():
        bad = (~torch.isfinite(got)).sum()
        raise AssertionError(f"{name}: {int(bad)} non-finite elements (an unwritten output is NaN-poisoned)")
    torch_err = (torch_lowp.double() - ref).abs().max() if torch_lowp is not None else torch.zeros((), dtype=ref.dtype)
    eps = torch.finfo(actual.dtype).eps if actual.is_floating_point() else 0.0
    bound = 2 * torch_err + ulps * eps * ref.abs() + atol
    err = (got - ref).abs()
    if (err > bound).any():
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{name}: max error {float(err.max()):.3e} exceeds the bound (2 x torch's {float(torch_err):.3e} "
            f"+ {ulps} ulp + {atol:g}); worst element {i}: got {float(got.flatten()[i])}, "
            f"reference {float(ref.flatten()[i])}")


def make_peft_lora_layer(in_features: int, out_features: int, *, ranks: tuple[int, ...] = (8,), dropout: float = 0.0,
                         bias: bool = False, lora_bias: bool = False, rslora: bool = False,
                         adapter_dtype: torch.dtype = torch.float32, base_dtype: torch.dtype = torch.float32,
                         four_bit: bool = False, seed: int = 0) -> tuple[torch.nn.Module, list[str]]:
    """A PEFT LoRA layer over a frozen ``nn.Linear`` (or a bitsandbytes NF4 ``Linear4bit``) with random, non-zero
    adapters ``a0, a1, ...`` of ``ranks`` (alpha 16 for the first, 2r for the others), all active.

    Example:
        >>> layer, names = make_peft_lora_layer(48, 40, ranks=(8, 4), dropout=0.1)
        >>> names
        ['a0', 'a1']
    """
    from peft.tuners import lora

    torch.manual_seed(seed)
    if four_bit:
        import bitsandbytes as bnb

        base = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=base_dtype,
                                 quant_type="nf4").to("cpu")
        cls = lora.Linear4bit
    else:
        base = torch.nn.Linear(in_features, out_features, bias=bias).to(base_dtype)
        cls = lora.Linear
    base.requires_grad_(False)  # as get_peft_model leaves it
    names = [f"a{i}" for i in range(len(ranks))]

    def config(r: int, alpha: int) -> lora.LoraConfig:
        return lora.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, lora_bias=lora_bias)

    layer = cls(base, names[0], config(ranks[0], 16), r=ranks[0], lora_alpha=16)
    for name, r in zip(names[1:], ranks[1:], strict=True):
        layer.update_layer(name, r, 2 * r, config(r, 2 * r))
    layer.set_adapter(names)
    for name in names:
        for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()):
            torch.nn.init.normal_(p, std=0.3)
            p.data = p.data.to(adapter_dtype)
    return layer, names


def lora_grads(layer: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor | None]:
    """The gradients of a PEFT LoRA layer's adapters, by name (``A[a0]``, ``B[a0]``, ``lora_bias[a0]``).

    Example:
        >>> sorted(lora_grads(layer, ["a0"]))
        ['A[a0]', 'B[a0]']
    """
    out = {}
    for n in names:
        out[f"A[{n}]"] = layer.lora_A[n].weight.grad
        out[f"B[{n}]"] = layer.lora_B[n].weight.grad
        if layer.lora_B[n].bias is not None:
            out[f"lora_bias[{n}]"] = layer.lora_B[n].bias.grad
    return out


def nf4_decoder(model: torch.nn.Module, compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Replace the ``nn.Linear`` layers of a transformers causal LM's decoder (attention and MLP) by bitsandbytes
    NF4 ``Linear4bit`` layers in place, as a 4-bit ``from_pretrained`` would load them; returns the model.

    Raises:
        ImportError: bitsandbytes is not installed.

    Example:
        >>> model = nf4_decoder(LlamaForCausalLM(config))
        >>> type(model.model.layers[0].mlp.up_proj).__name__
        'Linear4bit'
    """
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
                    q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.float32), requires_grad=False,
                                                 quant_type="nf4")
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
                    setattr(parent, name, q.to(device))
    model.is_loaded_in_4bit = True
    return model


def peft_lora_model(model: torch.nn.Module, *, dropout: float = 0.0, use_dora: bool = False,
                    targets: str | list[str] = "all-linear") -> torch.nn.Module:
    """``model`` wrapped by PEFT with rank-8 adapters (alpha 16) on ``targets``, B drawn from N(0, 0.2^2) rather
    than PEFT's zeros, so that the adapters change the outputs and their gradients.

    Example:
        >>> model = peft_lora_model(LlamaForCausalLM(config), dropout=0.1)
    """
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets, use_dora=use_dora)
    wrapped = peft.get_peft_model(model, config)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return wrapped
