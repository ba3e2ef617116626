"""SwiGLU, y = silu(gate) * up, and its backward: elementwise kernels over flat contiguous tensors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import elementwise_warps, empty_like

_BLOCK = 1024


@triton.jit
def swiglu_fwd_kernel(p_gate, p_up, p_out, n, BLOCK: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)  # int64: 4-bit models reach n > 2**31 at long context
    o_x = i_b * BLOCK + tl.arange(0, BLOCK)
    m_x = o_x < n
    b_g = tl.load(p_gate + o_x, mask=m_x, other=0.0).to(tl.float32)  # [BLOCK]
    b_u = tl.load(p_up + o_x, mask=m_x, other=0.0).to(tl.float32)  # [BLOCK]
    b_y = b_g * tl.sigmoid(b_g) * b_u
    tl.store(p_out + o_x, b_y.to(p_out.dtype.element_ty), mask=m_x)


@triton.jit
def swiglu_bwd_kernel(p_grad, p_gate, p_up, p_dgate, p_dup, n, BLOCK: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    o_x = i_b * BLOCK + tl.arange(0, BLOCK)
    m_x = o_x < n
    b_dy = tl.load(p_grad + o_x, mask=m_x, other=0.0).to(tl.float32)  # [BLOCK]
    b_g = tl.load(p_gate + o_x, mask=m_x, other=0.0).to(tl.float32)  # [BLOCK]
    b_u = tl.load(p_up + o_x, mask=m_x, other=0.0).to(tl.float32)  # [BLOCK]
    b_s = tl.sigmoid(b_g)
    # d silu(g)/dg = s * (1 + g * (1 - s))
    b_dg = b_dy * b_u * b_s * (1.0 + b_g * (1.0 - b_s))
    b_du = b_dy * b_g * b_s
    tl.store(p_dgate + o_x, b_dg.to(p_dgate.dtype.element_ty), mask=m_x)
    tl.store(p_dup + o_x, b_du.to(p_dup.dtype.element_ty), mask=m_x)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for contiguous tensors of one shape and dtype; returns a new tensor."""
    out = empty_like(gate)
    n = gate.numel()
    if n:
        swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, enable_fp_fusion=True,
                                                     num_warps=elementwise_warps(gate.device))
    return out


def swiglu_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) for contiguous tensors of one shape and dtype."""
    dgate, dup = empty_like(gate), empty_like(up)
    n = gate.numel()
    if n:
        swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](grad, gate, up, dgate, dup, n, BLOCK=_BLOCK,
                                                     enable_fp_fusion=True, num_warps=elementwise_warps(gate.device))
    return dgate, dup
