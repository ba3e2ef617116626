"""The model a plan runs: built from its config on the meta device, 4-bit where asked, wrapped by PEFT LoRA, and
the pieces that meta tensors would get wrong replaced by stand-ins that allocate what the real device does."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..checkpointing import OffloadedCheckpointing

#: Attention implementation names the plan registers in transformers (see :func:`register_attention`).
CPU_ATTENTION = "fastlora_plan_cpu"
FLASH_ATTENTION = "fastlora_plan_gpu"  # a name with "flash" in it makes transformers look for flash-attn


def _cpu_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """What transformers' sdpa attention runs on a CPU for a causal, unpadded training batch: torch's CPU flash
    kernel, O(S) memory (GQA native). On meta, ``scaled_dot_product_attention`` would take the math path and
    allocate ``[B, H, S, S]`` scores, so the plan calls that kernel's op itself; it has a meta implementation."""
    if attention_mask is not None:
        raise ValueError("fastlora.plan: only causal batches without padding are planned (attention_mask is not "
                         "None)")
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout, True,
                                                                      scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


class _FlashAttention(torch.autograd.Function):
    """The memory of FlashAttention-2 (flash-attn ``mha_fwd``/``mha_bwd`` in csrc/flash_attn/flash_api.cpp, which
    torch's CUDA flash SDPA vendors) on meta tensors: forward makes the output ``[B, S, Hq, D]`` and the fp32
    log-sum-exp ``[B, Hq, S]`` and saves q, k, v, out, lse; backward makes dq, dk, dv and, while it runs, an fp32
    ``dq_accum`` ``[B, S rounded up to 128, Hq, D]``, an fp32 ``softmax_d`` ``[B, Hq, S rounded]`` and, for GQA,
    dk and dv expanded to ``Hq`` heads (summed into dk, dv at the end)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        b, hq, s, d = q.shape
        out = q.new_empty((b, s, hq, d))
        lse = q.new_empty((b, hq, s), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        b, hq, s, d = q.shape
        s_round = -(-s // 128) * 128
        dq_accum = q.new_empty((b, s_round, hq, d), dtype=torch.float32)
        softmax_d = q.new_empty((b, hq, s_round), dtype=torch.float32)
        expanded = [q.new_empty((b, s, hq, d)) for _ in range(2)] if k.shape[1] != hq else []
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del dq_accum, softmax_d, expanded
        return dq, dk, dv


def _flash_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A GPU's attention (FlashAttention-2, or torch's flash SDPA) as memory: see :class:`_FlashAttention`."""
    if attention_mask is not None:
        raise ValueError("fastlora.plan: only causal batches without padding are planned (attention_mask is not "
                         "None)")
    return _FlashAttention.apply(query, key, value), None


def register_attention() -> None:
    """Register the plan's attention stand-ins with transformers (idempotent), with sdpa's mask function: for a
    causal batch without padding it makes no mask, as for the kernels they stand for."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, _cpu_attention)
    AttentionInterface.register(FLASH_ATTENTION, _flash_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    AttentionMaskInterface.register(FLASH_ATTENTION, sdpa_mask)


def nf4_meta(model: torch.nn.Module, compute_dtype: torch.dtype, *, double_quant: bool = True,
             blocksize: int = 64) -> torch.nn.Module:
    """Replace the decoder's ``nn.Linear`` layers by bitsandbytes NF4 ``Linear4bit`` layers on meta, in place.

    bitsandbytes cannot quantize meta tensors, so each layer gets what a quantized one holds, as storage: a
    ``Params4bit`` of uint8 ``[(N*K + 1) // 2, 1]`` and a ``QuantState`` with its absmax (uint8 codes plus the
    nested fp32 absmax and 256-entry code table under double quantization, else fp32), the 16-entry NF4 code and
    the offset, all meta tensors of their real shapes and dtypes. Everything that reads a 4-bit weight (PEFT's
    ``Linear4bit``, bitsandbytes' matmul, fastlora's ``NF4Weight.from_bnb``) then takes the path it takes on a GPU,
    and each dequantize makes its real-sized output.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    meta = torch.device("meta")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                n, k = child.out_features, child.in_features
                blocks = -(-(n * k) // blocksize)
                q = bnb.nn.Linear4bit(k, n, bias=child.bias is not None, compute_dtype=compute_dtype,
                                      quant_type="nf4", device=meta)
                q.support_avx512bf16_for_cpu = False
                code = torch.empty(16, dtype=torch.float32, device=meta)
                if double_quant:
                    state2 = QuantState(absmax=torch.empty(-(-blocks // 256), dtype=torch.float32, device=meta),
                                        code=torch.empty(256, dtype=torch.float32, device=meta), blocksize=256,
                                        dtype=torch.float32)
                    state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, device=meta),
                                       shape=torch.Size([n, k]), code=code, blocksize=blocksize, quant_type="nf4",
                                       dtype=compute_dtype, offset=torch.empty((), dtype=torch.float32, device=meta),
                                       state2=state2)
                else:
                    state = QuantState(absmax=torch.empty(blocks, dtype=torch.float32, device=meta),
                                       shape=torch.Size([n, k]), code=code, blocksize=blocksize, quant_type="nf4",
                                       dtype=compute_dtype)
                data = torch.empty(((n * k + 1) // 2, 1), dtype=torch.uint8, device=meta)
                q.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=blocksize,
                                             compress_statistics=double_quant, quant_type="nf4",
                                             bnb_quantized=True, module=q)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(parent, name, q)
    model.is_loaded_in_4bit = True
    return model


def quant_state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors of every 4-bit weight's ``QuantState`` (absmax, code, nested state): storage that is neither a
    parameter nor a buffer."""
    out = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            out += [t for t in (state.absmax, state.code, getattr(state, "offset", None))
                    if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return out


class MetaOffload(OffloadedCheckpointing):
    """:class:`fastlora.OffloadedCheckpointing` on meta tensors, as it runs on a GPU: each checkpointed layer's
    input goes to "host" memory when the next layer starts (a meta tensor counted as host bytes by the tracker),
    comes back, prefetched one layer ahead, in the backward. Only the host copy is a stand-in: the decisions (which
    tensors, when, the newest one kept) are the class's own code."""

    def __init__(self, tracker: Any) -> None:
        super().__init__(use_reentrant=False, pin_memory=False, preserve_rng_state=False)
        self.offload_device_types = ("meta",)  # set after __init__, whose check knows only cuda and cpu
        self.tracker = tracker

    def _host_like(self, tensor: torch.Tensor) -> torch.Tensor:
        with _disable_current_modes():
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        self.tracker.to_host(host)
        return host
