"""Gated activations over a ``[M, 2I]`` tensor holding gate and up side by side (a fused gate_up projection's
output): ``h = act(gate) * up`` with act one of silu (SwiGLU), gelu_tanh and gelu (GeGLU), and the backward,
which writes ``[d gate | d up]`` over the input itself (the LoRA MLP's backward has no further use for it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import elementwise_warps

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
_BLOCK = 1024


@triton.jit
def _act(b_g, ACT: tl.constexpr):
    """(act(g), act'(g)), in fp32."""
    if ACT == 0:
        b_s = tl.sigmoid(b_g)
        return b_g * b_s, b_s * (1.0 + b_g * (1.0 - b_s))
    elif ACT == 1:
        # 0.5 g (1 + tanh(z)), z = sqrt(2/pi) (g + 0.044715 g^3); tanh(z) = 2 sigmoid(2z) - 1.
        b_z = 0.7978845608028654 * (b_g + 0.044715 * b_g * b_g * b_g)
        b_t = 2.0 * tl.sigmoid(2.0 * b_z) - 1.0
        b_dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * b_g * b_g)
        return 0.5 * b_g * (1.0 + b_t), 0.5 * (1.0 + b_t) + 0.5 * b_g * (1.0 - b_t * b_t) * b_dz
    else:
        b_cdf = 0.5 * (1.0 + tl.math.erf(b_g * 0.7071067811865476))
        return b_g * b_cdf, b_cdf + b_g * 0.3989422804014327 * tl.exp(-0.5 * b_g * b_g)


@triton.jit
def glu_fwd_kernel(p_gu, p_dh, p_h, n_i, stride_gu, stride_h, ACT: tl.constexpr, BACKWARD: tl.constexpr,
                   BLOCK: tl.constexpr):
    i_m, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_i = i_b * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] columns of gate (and of up, I further on)
    m_i = o_i < n_i
    p_row = p_gu + i_m * stride_gu
    b_g = tl.load(p_row + o_i, mask=m_i, other=0.0).to(tl.float32)  # [BLOCK]
    b_u = tl.load(p_row + n_i + o_i, mask=m_i, other=0.0).to(tl.float32)  # [BLOCK]
    b_a, b_da = _act(b_g, ACT)
    if BACKWARD:
        # Both reads happened above: writing the gradients over gate and up is safe.
        b_dh = tl.load(p_dh + i_m * stride_h + o_i, mask=m_i, other=0.0).to(tl.float32)
        tl.store(p_row + o_i, (b_dh * b_u * b_da).to(p_gu.dtype.element_ty), mask=m_i)
        tl.store(p_row + n_i + o_i, (b_dh * b_a).to(p_gu.dtype.element_ty), mask=m_i)
    else:
        tl.store(p_h + i_m * stride_h + o_i, (b_a * b_u).to(p_h.dtype.element_ty), mask=m_i)


def _grid(gu: torch.Tensor) -> tuple[int, int]:
    return gu.shape[0], triton.cdiv(gu.shape[1] // 2, _BLOCK)


def glu_fwd(gu: torch.Tensor, out: torch.Tensor, activation: str) -> None:
    """``out [M, I] = act(gu[:, :I]) * gu[:, I:]``; rows contiguous."""
    if out.numel():
        glu_fwd_kernel[_grid(gu)](gu, out, out, gu.shape[1] // 2, gu.stride(0), out.stride(0),
                                  ACT=ACTIVATIONS[activation], BACKWARD=False, BLOCK=_BLOCK, enable_fp_fusion=True,
                                  num_warps=elementwise_warps(gu.device))


def glu_bwd_(dh: torch.Tensor, gu: torch.Tensor, activation: str) -> None:
    """``gu <- [dh * up * act'(gate) | dh * act(gate)]`` in place; rows contiguous."""
    if dh.numel():
        glu_fwd_kernel[_grid(gu)](gu, dh, dh, gu.shape[1] // 2, gu.stride(0), dh.stride(0),
                                  ACT=ACTIVATIONS[activation], BACKWARD=True, BLOCK=_BLOCK, enable_fp_fusion=True,
                                  num_warps=elementwise_warps(gu.device))
