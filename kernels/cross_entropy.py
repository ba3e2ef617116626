"""Cross-entropy over any vocabulary: an online softmax over chunks of the row, and the logits' gradient written
in the same launch (into a new buffer, or over the logits themselves).

Per row, with x the (optionally soft-capped) logits, y the label, eps the label smoothing and z the z-loss weight:
    loss = (1 - eps) * (lse - x_y) + eps * (lse - mean(x)) + z * lse^2
    dloss/dx_j = softmax_j * (1 + 2 z lse) - eps / V - (1 - eps) * [j == y]     (times the soft-cap's derivative)
Ignored rows have loss 0 and gradient 0; a label outside [0, V) gives a NaN loss and a NaN gradient row instead of
reading out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 8 warps over a 4096-wide chunk: 16 logits a thread, 32 registers on sm_90a, all 64 warps of an SM resident
# (4 warps took 55 registers and 56% occupancy; see fastlora.benchmarks.static). An FLCE chunk of 1024 rows is then
# 0.97 of an H100's resident CTAs rather than 1.29 waves.
NUM_WARPS = 8


@triton.jit
def _tanh(b_u):
    # Triton has no tanh that also runs in the interpreter (libdevice's is GPU-only). 1 - 2 / (exp(2u) + 1)
    # saturates cleanly at +-1 but cancels for small |u| (3.5e-6 absolute error in a capped logit at softcap 30,
    # 8x torch.tanh's), so below 0.625 use Cephes' tanhf polynomial instead (at most 2.4 ulp, measured).
    b_z = b_u * b_u
    b_p = (((-5.70498872745e-3 * b_z + 2.06390887954e-2) * b_z - 5.37397155531e-2) * b_z
           + 1.33314422036e-1) * b_z - 3.33332819422e-1
    b_small = b_u + b_u * b_z * b_p
    b_large = 1.0 - 2.0 / (tl.exp(2.0 * b_u) + 1.0)
    return tl.where(tl.abs(b_u) < 0.625, b_small, b_large)


@triton.jit
def _capped(b_x, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        b_x = softcap * _tanh(b_x / softcap)
    return b_x


@triton.jit
def cross_entropy_fwd_kernel(p_logits, p_labels, p_grad, p_loss, p_lse, p_scale, stride_row, stride_grad,
                             stride_scale, V, ignore_index, label_smoothing, z_loss, softcap,
                             SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr,
                             BLOCK_V: tl.constexpr):
    i_r = tl.program_id(0).to(tl.int64)
    p_row = p_logits + i_r * stride_row
    b_label = tl.load(p_labels + i_r).to(tl.int64)
    valid = b_label != ignore_index
    in_range = (b_label >= 0) & (b_label < V)

    # Pass 1: running max and rescaled sum of exponentials (fp32), and the sum of logits for smoothing.
    b_m = tl.full((), float("-inf"), tl.float32)
    b_s = tl.zeros((), tl.float32)
    b_sum_x = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        m_v = o_v < V
        b_x = _capped(tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32), softcap, SOFTCAP)
        b_x = tl.where(m_v, b_x, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_x, axis=0))
        b_s = b_s * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_x - b_m_new), axis=0)
        b_m = b_m_new
        if SMOOTHING:  # a reduction per chunk that only smoothing needs
            b_sum_x += tl.sum(tl.where(m_v, b_x, 0.0), axis=0)
    b_lse = b_m + tl.log(b_s)

    b_xy = _capped(tl.load(p_row + b_label, mask=valid & in_range, other=0.0).to(tl.float32), softcap, SOFTCAP)
    b_loss = (1.0 - label_smoothing) * (b_lse - b_xy) + label_smoothing * (b_lse - b_sum_x / V) \
        + z_loss * b_lse * b_lse
    b_loss = tl.where(valid, tl.where(in_range, b_loss, float("nan")), 0.0)
    tl.store(p_loss + i_r, b_loss)
    tl.store(p_lse + i_r, b_lse)

    if WRITE_GRAD:
        # Pass 2: the gradient, already scaled by the reduction (1 / count for a mean, or a per-row factor).
        # Each chunk is read before it is written, so the gradient may overwrite the logits in place.
        # A label out of range makes its row's gradient NaN, as its loss (torch would raise; fastlora does not sync).
        b_scale = tl.where(valid, tl.where(in_range, tl.load(p_scale + i_r * stride_scale).to(tl.float32),
                                           float("nan")), 0.0)
        p_grow = p_grad + i_r * stride_grad
        for v0 in range(0, V, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            m_v = o_v < V
            b_x = _capped(tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32), softcap, SOFTCAP)  # [BLOCK_V]
            b_g = tl.exp(b_x - b_lse) * (1.0 + 2.0 * z_loss * b_lse) - label_smoothing / V
            b_g = tl.where(o_v == b_label, b_g - (1.0 - label_smoothing), b_g)
            if SOFTCAP:
                b_t = b_x / softcap
                b_g = b_g * (1.0 - b_t * b_t)
            tl.store(p_grow + o_v, (b_g * b_scale).to(p_grad.dtype.element_ty), mask=m_v)


def cross_entropy_fwd(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor | None,
                      loss: torch.Tensor, lse: torch.Tensor, *, ignore_index: int, label_smoothing: float,
                      z_loss: float, softcap: float) -> None:
    """Per-row losses and log-sum-exps into ``loss``/``lse`` ([N] fp32) and, unless ``grad`` is None, the gradient
    scaled by ``scale`` ([] or [N] fp32) into ``grad`` ([N, V], may be ``logits`` itself). Rows must be contiguous."""
    n, v = logits.shape
    if n == 0:
        return
    cross_entropy_fwd_kernel[(n,)](
        logits, labels, grad if grad is not None else logits, loss, lse, scale, logits.stride(0),
        grad.stride(0) if grad is not None else 0, scale.stride(0) if scale.dim() else 0, v, ignore_index,
        label_smoothing, z_loss, softcap or 1.0,
        SOFTCAP=softcap is not None, SMOOTHING=label_smoothing != 0.0, WRITE_GRAD=grad is not None,
        BLOCK_V=min(triton.next_power_of_2(v), 4096), enable_fp_fusion=True, num_warps=NUM_WARPS,
    )
