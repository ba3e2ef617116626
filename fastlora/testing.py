"""Helpers for testing kernels against their references, and simulated devices for the dispatcher.

Used by fastlora's own tests and meant for anyone adding an op: the tolerance rule of DESIGN.md in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor,
                              torch_lowp: torch.Tensor | Sequence[torch.Tensor] | None = None, *, ulps: float = 1.0,
                              atol: float = 1e-6, name: str = "output") -> None:
    """Check a kernel's output with the tolerance rule of DESIGN.md.

    The kernel's error against the fp32 ``reference`` may be at most twice the error of PyTorch's own
    computation in the same low precision (``torch_lowp``), plus a floor of ``ulps`` units in the last place of
    ``actual``'s dtype (stores may truncate in the Triton interpreter) and ``atol``.

    Args:
        actual: the kernel's output, any dtype.
        reference: the fp32 (or fp64) reference, same shape.
        torch_lowp: PyTorch's result computed in ``actual``'s dtype; None counts its error as zero. Several
            results (the same maths in different arrangements, such as a fused op's GEMMs and an unfused layer's):
            the largest of their errors, since each is PyTorch's own and their rounding varies with the BLAS kernels
            the CPU gets.

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
    lows = [] if torch_lowp is None else [torch_lowp] if isinstance(torch_lowp, torch.Tensor) else list(torch_lowp)
    torch_err = max(((low.double() - ref).abs().max() for low in lows), default=torch.zeros((), dtype=ref.dtype))
    eps = torch.finfo(actual.dtype).eps if actual.is_floating_point() else 0.0
    bound = 2 * torch_err + ulps * eps * ref.abs() + atol
    err = (got - ref).abs()
    if (err > bound).any():
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{name}: max error {float(err.max()):.3e} exceeds the bound (2 x torch's {float(torch_err):.3e} "
            f"+ {ulps} ulp + {atol:g}); worst element {i}: got {float(got.flatten()[i])}, "
            f"reference {float(ref.flatten()[i])}")


def assert_grads_close_to_reference(actual: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                                    torch_lowp: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]], *,
                                    ulps: float = 2.0, atol: float = 1e-6, name: str = "grad") -> None:
    """:func:`assert_close_to_reference` for every tensor of a dict (gradients by name); the keys must agree.
    ``torch_lowp`` may be several dicts (PyTorch's results in several arrangements): the largest error counts.

    Example:
        >>> assert_grads_close_to_reference(lora_grads(layer, names), lora_grads(twin, names), peft_grads)
    """
    lows = [torch_lowp] if isinstance(torch_lowp, dict) else list(torch_lowp)
    if any(actual.keys() != d.keys() for d in (reference, *lows)):
        raise AssertionError(f"{name}: keys {sorted(actual)} vs reference {sorted(reference)} and torch's "
                             f"{[sorted(d) for d in lows]}")
    for key in actual:
        if any(actual[key].dtype != d[key].dtype for d in lows):
            raise AssertionError(f"{name} {key}: dtype {actual[key].dtype}, torch's {[d[key].dtype for d in lows]}")
        assert_close_to_reference(actual[key], reference[key], [d[key] for d in lows], ulps=ulps, atol=atol,
                                  name=f"{name} {key}")


def assert_pooled_close_to_reference(actual: list[torch.Tensor], reference: list[torch.Tensor],
                                     torch_lowp: list[torch.Tensor], *, ulps: float = 4.0,
                                     name: str = "output") -> None:
    """The tolerance rule of DESIGN.md, normwise over many tensors (a model's gradients over several steps): the
    2-norm of ``actual - reference`` over all of them at most twice that of ``torch_lowp - reference``, plus
    ``ulps`` units in the last place of ``actual``'s dtype times the norm of ``reference``.

    Pooling is for results whose single largest element error is too noisy to bound (a model's losses and
    gradients: their error against fp64 swings several-fold from one batch to the next for either model).

    Example:
        >>> assert_pooled_close_to_reference(patched_grads, fp64_grads, unpatched_grads, name="LoRA gradients")
    """
    if not (len(actual) == len(reference) == len(torch_lowp)) or not actual:
        raise AssertionError(f"{name}: {len(actual)} tensors, reference {len(reference)}, torch's {len(torch_lowp)}")

    def norm(tensors: list[torch.Tensor], minus: list[torch.Tensor] | None = None) -> float:
        total = 0.0
        for i, t in enumerate(tensors):
            d = t.double() - (minus[i].double() if minus is not None else 0)
            total += float((d * d).sum())
        return total**0.5

    got, theirs, size = norm(actual, reference), norm(torch_lowp, reference), norm(reference)
    floor = ulps * torch.finfo(actual[0].dtype).eps * size
    if not got <= 2 * theirs + floor:  # also fails on NaN
        raise AssertionError(f"{name}: pooled error {got:.3e} exceeds 2 x torch's {theirs:.3e} + {ulps} ulp "
                             f"({floor:.3e}), over {len(actual)} tensors of norm {size:.3e}")


def torch_twin(module: torch.nn.Module, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A deep copy of ``module`` (a layer or a whole model, PEFT-wrapped or not) in ``dtype``, each bitsandbytes
    4-bit layer replaced by an ``nn.Linear`` holding its weight as :func:`decode_nf4` reads the bytes: the same maths
    computed by PyTorch alone. In fp64 it is the exact run the tolerance rule measures errors against; in fp32 it is
    PyTorch's own fp32 computation of a 4-bit model, the rule's yardstick (bitsandbytes' CPU kernels compute it in
    other orders on other CPUs, more or less accurately). Parameters keep their names and ``requires_grad``.

    Example:
        >>> exact, fp32 = torch_twin(peft_layer), torch_twin(peft_layer, torch.float32)
        >>> exact(x.double()).dtype
        torch.float64
    """
    import copy

    twin = copy.deepcopy(module)
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ == "Linear4bit" and not hasattr(child, "lora_A"):  # bnb's, not PEFT's
                dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                dense.weight.data = decode_nf4(child, dtype=torch.float32)
                if child.bias is not None:
                    dense.bias.data = child.bias.data.detach().float().clone()
                dense.requires_grad_(False)
                setattr(parent, child_name, dense)
    return twin.to(dtype)


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

        base = _cpu_layout_kept(bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=base_dtype,
                                                  quant_type="nf4").to("cpu"))
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


def _cpu_layout_kept(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer`` with bitsandbytes' CPU repack turned off: on a CPU with AVX512-BF16 its first eval-mode no-grad
    forward would rewrite the weight in place into another layout (computing differently, without a backward, and
    unreadable by fastlora), so the same test would run other code on other CPUs."""
    layer.support_avx512bf16_for_cpu = False
    return layer


def nf4_decoder(model: torch.nn.Module, compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Replace the ``nn.Linear`` layers of a transformers causal LM's decoder (attention and MLP) by bitsandbytes
    NF4 ``Linear4bit`` layers in place, as a 4-bit ``from_pretrained`` would load them (with bitsandbytes' CPU
    repack for eval-mode inference turned off); returns the model.

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
                    q = _cpu_layout_kept(bnb.nn.Linear4bit(child.in_features, child.out_features,
                                                           bias=child.bias is not None, compute_dtype=compute_dtype,
                                                           quant_type="nf4", device="cpu"))
                    # module=q: the layer keeps a reference to the quant state, as from_pretrained's loading does
                    # (bitsandbytes restores a weight's lost state from it, under FSDP).
                    q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.float32), requires_grad=False,
                                                 quant_type="nf4", module=q)
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


# An independent NF4 decoder: the test oracle for every NF4 backend, and for bitsandbytes itself. It is written from
# the format (REFERENCE.md, "bitsandbytes NF4 storage") and shares no code with fastlora.ops.nf4 or bitsandbytes:
# bitsandbytes' CPU dequantize is wrong for some shapes (see bnb_dequantize_is_sane), so its output is no oracle.

#: The 16 NF4 values, by 4-bit code (the format's table, typed in here rather than imported).
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def decode_nf4_bytes(data: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                     dtype: torch.dtype, blocksize: int, *, absmax_code: torch.Tensor | None = None,
                     absmax2: torch.Tensor | None = None, offset: torch.Tensor | float | None = None,
                     nested_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode bitsandbytes' NF4 bytes the plain way, element by element: the oracle for NF4 tests.

    Element ``i`` of the row-major weight is the nibble of byte ``i // 2`` (the high nibble for even ``i``),
    scaled by the absmax of block ``i // blocksize`` (blocks run over the flat index, across rows). With double
    quantization the absmax of block ``b`` is ``absmax_code[absmax[b]] * absmax2[b // 256]`` rounded to
    ``nested_dtype``, plus ``offset`` rounded to ``nested_dtype``, the sum rounded to ``nested_dtype``, as
    bitsandbytes decodes it in ``QuantState.state2.dtype`` (fp32 unless a checkpoint or its CPU repack says
    otherwise). Each value is ``NF4[nibble] * absmax`` in fp32, rounded once to ``dtype``.

    Args:
        data: uint8 ``[ceil(numel / 2)]`` (any shape; read flat).
        absmax: ``[ceil(numel / blocksize)]``: fp32 scales, or uint8 codes into ``absmax_code`` when nested.
        shape: the logical weight shape; dtype: the output dtype; blocksize: elements per block.
        absmax_code: fp32 ``[256]`` (nested only); absmax2: fp32 ``[ceil(blocks / 256)]`` (nested only);
        offset: 0-dim tensor or float (nested only); nested_dtype: the dtype the nested absmax is decoded in.

    Returns:
        ``shape`` in ``dtype``, on ``data``'s device.

    Example:
        >>> decode_nf4_bytes(torch.tensor([0x0F, 0x78], dtype=torch.uint8), torch.tensor([2.0]), (4,),
        ...                  torch.float32, 64)
        tensor([-2.0000,  2.0000,  0.0000,  0.1592])
    """
    device = data.device
    numel = 1
    for size in shape:
        numel *= int(size)
    data = data.reshape(-1).view(torch.uint8)
    if data.numel() != (numel + 1) // 2:
        raise ValueError(f"decode_nf4_bytes: data has {data.numel()} bytes, shape {tuple(shape)} needs "
                         f"{(numel + 1) // 2}")
    index = torch.arange(numel, device=device)
    byte = data[index // 2].to(torch.int64)
    nibble = torch.where(index % 2 == 0, byte // 16, byte % 16)
    block = index // blocksize
    if absmax_code is None:
        scales = absmax.reshape(-1).float()
    else:
        codes = absmax.reshape(-1).to(torch.int64)
        b = torch.arange(codes.numel(), device=device)
        scaled = (absmax_code.float()[codes] * absmax2.float()[b // 256]).to(nested_dtype)
        shift = torch.as_tensor(offset, dtype=torch.float32, device=device).to(nested_dtype)
        scales = (scaled.float() + shift.float()).to(nested_dtype).float()
    nf4 = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    return (nf4[nibble] * scales[block]).to(dtype).reshape(tuple(shape))


def decode_nf4(weight: object, quant_state: object | None = None, *, dtype: torch.dtype | None = None
               ) -> torch.Tensor:
    """:func:`decode_nf4_bytes` of an ``NF4Weight``, a bitsandbytes ``Params4bit`` (or a layer holding one), or
    packed bytes with their bitsandbytes ``QuantState``; a bitsandbytes weight's nested absmax is decoded in its
    ``state2.dtype``, as bitsandbytes does.

    Args:
        weight: the weight; quant_state: its ``QuantState`` when ``weight`` is the packed tensor itself.
        dtype: output dtype; default the weight's own (``NF4Weight.dtype`` or ``QuantState.dtype``).

    Returns:
        The weight's logical shape in ``dtype``.

    Example:
        >>> layer = bnb.nn.Linear4bit(128, 40, quant_type="nf4").to("cpu")
        >>> decode_nf4(layer).shape
        torch.Size([40, 128])
    """
    from .ops.nf4_weight import NF4Weight

    if isinstance(weight, NF4Weight):
        return decode_nf4_bytes(weight.data, weight.absmax, weight.shape, dtype or weight.dtype, weight.blocksize,
                                absmax_code=weight.absmax_code, absmax2=weight.absmax2, offset=weight.offset)
    if quant_state is None:
        if not isinstance(weight, torch.Tensor) and hasattr(weight, "weight"):
            weight = weight.weight
        quant_state = getattr(weight, "quant_state", None)
    if not isinstance(weight, torch.Tensor) or quant_state is None:
        raise TypeError(f"decode_nf4: expected an NF4Weight, a bitsandbytes Params4bit or a layer holding one, or "
                        f"packed bytes with their QuantState; got {type(weight).__name__}")
    if quant_state.quant_type != "nf4" or getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("decode_nf4: not an NF4 weight in bitsandbytes' storage layout (FP4, or repacked for CPU)")
    nested = {}
    if quant_state.nested:
        state2 = quant_state.state2
        nested = dict(absmax_code=state2.code, absmax2=state2.absmax, offset=quant_state.offset,
                      nested_dtype=state2.dtype or torch.float32)
    return decode_nf4_bytes(weight.data.view(torch.uint8), quant_state.absmax, tuple(quant_state.shape),
                            dtype or quant_state.dtype, quant_state.blocksize, **nested)


_BNB_SANE: dict[tuple, bool] = {}
_BNB_BYTES: dict[tuple, tuple] = {}


def bnb_dequantize_is_sane(shape: tuple[int, ...], blocksize: int = 64, *, dtype: torch.dtype = torch.float32,
                           nested: bool = False, device: torch.device | str = "cpu") -> bool:
    """Whether ``bitsandbytes.functional.dequantize_4bit`` returns exactly what its own NF4 bytes encode for a
    weight of ``shape`` and ``blocksize``, dequantized to ``dtype`` on ``device``, with this bitsandbytes here.

    It quantizes a fixed random weight with bitsandbytes (its bytes are right) and compares bitsandbytes'
    dequantize with :func:`decode_nf4` of the same bytes (values only: bitsandbytes returns some one-row weights
    transposed). bitsandbytes 0.49-0.50 on an AVX-512 CPU misread weights whose rows are not whole blocks (e.g.
    ``(40, 96)`` at blocksize 64): check this before using its output as a reference. Cached per argument set.

    Example:
        >>> bnb_dequantize_is_sane((40, 128), 64), bnb_dequantize_is_sane((40, 96), 64)  # an AVX-512 CPU
        (True, False)
    """
    import copy

    import bitsandbytes.functional as bnbf

    place = (tuple(int(s) for s in shape), int(blocksize), bool(nested), str(torch.device(device)))
    key = (*place, dtype)
    if key not in _BNB_SANE:
        if place not in _BNB_BYTES:
            g = torch.Generator().manual_seed(1234)
            w = (torch.randn(place[0], generator=g) * 3).to(device)
            _BNB_BYTES[place] = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested,
                                                   quant_type="nf4")
        packed, state = _BNB_BYTES[place]
        state = copy.copy(state)
        state.dtype = dtype  # the same bytes, dequantized to another dtype (a separate kernel in bitsandbytes)
        theirs = bnbf.dequantize_4bit(packed, state)
        expected = decode_nf4(packed, state)
        _BNB_SANE[key] = theirs.dtype == expected.dtype and torch.equal(theirs.reshape(expected.shape), expected)
    return _BNB_SANE[key]
