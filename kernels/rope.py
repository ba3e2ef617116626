"""Rotary position embedding of q and k in one launch, forward and backward (a constexpr flag), any strides.

The half-split ("rotate_half") layout: with x = [x1, x2] over the first ``ROT`` features,
    forward:  y1 = x1 * c1 - x2 * s1,   y2 = x2 * c2 + x1 * s2
    backward: g1 = d1 * c1 + d2 * s2,   g2 = d2 * c2 - d1 * s1   (the transpose: a rotation by -theta)
Features past ``ROT`` (partial rotary, as in Phi3) pass through unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import elementwise_warps


@triton.jit
def _rotate_heads(p_x, p_y, o_bs_x, o_bs_y, sx_h, sy_h, n_heads, b_c1, b_c2, b_s1, b_s2,
                  HALF: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_P: tl.constexpr, BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr):
    o_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    m_r = o_r < HALF
    for h0 in range(0, n_heads, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        m_h = o_h < n_heads
        m = m_h[:, None] & m_r[None, :]  # [BLOCK_H, BLOCK_R]
        p_x1 = p_x + o_bs_x + o_h[:, None].to(tl.int64) * sx_h + o_r[None, :]
        p_y1 = p_y + o_bs_y + o_h[:, None].to(tl.int64) * sy_h + o_r[None, :]
        b_x1 = tl.load(p_x1, mask=m, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_R]
        b_x2 = tl.load(p_x1 + HALF, mask=m, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_R]
        if BACKWARD:
            b_y1 = b_x1 * b_c1[None, :] + b_x2 * b_s2[None, :]
            b_y2 = b_x2 * b_c2[None, :] - b_x1 * b_s1[None, :]
        else:
            b_y1 = b_x1 * b_c1[None, :] - b_x2 * b_s1[None, :]
            b_y2 = b_x2 * b_c2[None, :] + b_x1 * b_s2[None, :]
        tl.store(p_y1, b_y1.to(p_y.dtype.element_ty), mask=m)
        tl.store(p_y1 + HALF, b_y2.to(p_y.dtype.element_ty), mask=m)
        if COPY_PASS:
            o_p = 2 * HALF + tl.arange(0, BLOCK_P)  # [BLOCK_P]
            m_p = m_h[:, None] & (o_p < D)[None, :]
            b_p = tl.load(p_x + o_bs_x + o_h[:, None].to(tl.int64) * sx_h + o_p[None, :], mask=m_p)
            b_p = b_p.to(p_y.dtype.element_ty)  # [BLOCK_H, BLOCK_P]; the output may be promoted (bf16 q, fp32 cos)
            tl.store(p_y + o_bs_y + o_h[:, None].to(tl.int64) * sy_h + o_p[None, :], b_p, mask=m_p)


@triton.jit
def rope_fwd_kernel(p_q, p_k, p_qo, p_ko, p_cos, p_sin, S,
                    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s, sc_b, sc_s,
                    HQ, HK, HALF: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_P: tl.constexpr, BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr):
    # One program per (batch, position): cos and sin are loaded once and serve every q and k head.
    i_bs = tl.program_id(0).to(tl.int64)
    i_b = i_bs // S
    i_s = i_bs % S
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < HALF
    o_c = i_b * sc_b + i_s * sc_s
    b_c1 = tl.load(p_cos + o_c + o_r, mask=m_r, other=0.0).to(tl.float32)  # [BLOCK_R]
    b_c2 = tl.load(p_cos + o_c + HALF + o_r, mask=m_r, other=0.0).to(tl.float32)
    b_s1 = tl.load(p_sin + o_c + o_r, mask=m_r, other=0.0).to(tl.float32)
    b_s2 = tl.load(p_sin + o_c + HALF + o_r, mask=m_r, other=0.0).to(tl.float32)
    _rotate_heads(p_q, p_qo, i_b * sq_b + i_s * sq_s, i_b * sqo_b + i_s * sqo_s, sq_h, sqo_h, HQ,
                  b_c1, b_c2, b_s1, b_s2, HALF, D, BLOCK_H, BLOCK_R, BLOCK_P, BACKWARD, COPY_PASS)
    _rotate_heads(p_k, p_ko, i_b * sk_b + i_s * sk_s, i_b * sko_b + i_s * sko_s, sk_h, sko_h, HK,
                  b_c1, b_c2, b_s1, b_s2, HALF, D, BLOCK_H, BLOCK_R, BLOCK_P, BACKWARD, COPY_PASS)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_out: torch.Tensor,
         k_out: torch.Tensor, *, head_dim: int, backward: bool = False) -> None:
    """Rotate ``q`` and ``k`` into ``q_out`` and ``k_out`` (which may be ``q`` and ``k`` themselves).

    Args:
        q, k, q_out, k_out: ``[B, H, S, D]`` views in any strides whose last dimension is contiguous (``head_dim``
            names which of dims 1 and 2 holds the heads: 1 for HF's ``[B, H, S, D]``, 2 for ``[B, S, H, D]``).
            The outputs may have another float dtype than the inputs: the rotation is computed in fp32 and
            rounded once to theirs.
        cos, sin: ``[B or 1, S, ROT]`` with a contiguous last dimension; ``ROT <= D`` is even.
        backward: apply the transposed rotation (the gradient of the forward).
    """
    seq_dim = 3 - head_dim
    B, S, D = q.shape[0], q.shape[seq_dim], q.shape[-1]
    hq, hk = q.shape[head_dim], k.shape[head_dim]
    rot = cos.shape[-1]
    half = rot // 2
    if B * S == 0:
        return

    def strides(t: torch.Tensor) -> tuple[int, int, int]:
        return t.stride(0), t.stride(head_dim), t.stride(seq_dim)

    sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
    copy_pass = rot < D and q_out.data_ptr() != q.data_ptr()
    rope_fwd_kernel[(B * S,)](
        q, k, q_out, k_out, cos, sin, S, *strides(q), *strides(k), *strides(q_out), *strides(k_out),
        sc_b, cos.stride(1), hq, hk,
        HALF=half, D=D, BLOCK_H=min(triton.next_power_of_2(max(hq, hk)), 16), BLOCK_R=triton.next_power_of_2(half),
        BLOCK_P=triton.next_power_of_2(max(D - rot, 1)), BACKWARD=backward, COPY_PASS=copy_pass,
        enable_fp_fusion=True, num_warps=elementwise_warps(q.device),
    )
