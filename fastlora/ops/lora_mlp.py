"""A gated MLP with LoRA on its three projections: ``down(act(gate(x)) * up(x))``, the activation recomputed in
the backward instead of stored.

Forward: gate and up as one ``[M, 2I]`` output (two projections of X read once, or Phi3's fused ``gate_up``), the
gated activation ``h`` (``[M, I]``) by one kernel, then the down projection. Only X, the ``[M, 2I]`` gate_up output
and the thin ``[M, r]`` down-projections are kept: ``h`` (``M x I``, 235 MB per layer at 8K tokens of Llama-3.1-8B
in bf16) is made again in the backward, which then writes the activation's gradient over the gate_up buffer and
hands it to the gate/up backward as their ``dY``.

The stack: the ops of :mod:`fastlora.ops.lora`, :mod:`fastlora.ops.lora_qkv` and :mod:`fastlora.ops.glu` ->
:class:`LoRAMLPFunction` -> :func:`lora_mlp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._autocast import autocast_disabled, autocast_off
from ._library import call
from .glu import ACTIVATIONS, activation_reference
from .lora import _backward as linear_backward
from .lora import _check, blocks, dropout, dropout_inputs, flat_input, gemm_dtypes, lora_linear_reference
from .lora import _forward as linear_forward
from .lora_qkv import _backward as qkv_backward
from .lora_qkv import _forward as qkv_forward
from .nf4_weight import NF4Weight

Base = torch.Tensor | NF4Weight


class LoRAProjection(NamedTuple):
    """One projection with one adapter: the frozen ``base`` ``[N, K]``, ``A`` ``[r, K]``, ``B`` ``[N, r]``."""

    base: Base
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    bias: torch.Tensor | None = None
    dropout_p: float = 0.0


def lora_mlp_reference(x: torch.Tensor, gate_up: Sequence[LoRAProjection], down: LoRAProjection,
                       activation: str = "silu") -> torch.Tensor:
    """Plain differentiable PyTorch on dense bases, no dropout: the test oracle."""
    def proj(t: torch.Tensor, p: LoRAProjection) -> torch.Tensor:
        return lora_linear_reference(t, p.base, [p.A], [p.B], [p.scaling], bias=p.bias)

    outs = [proj(x, p) for p in gate_up]
    g, u = outs if len(outs) == 2 else outs[0].chunk(2, dim=-1)
    return proj(activation_reference(g, activation) * u, down)


def _forward(x: torch.Tensor, gu_bases: tuple[Base, ...], down_base: Base, activation: str, scaling: Sequence[float],
             dropout_p: Sequence[float], A: list[torch.Tensor], B: list[torch.Tensor],
             biases: list[torch.Tensor | None]) -> tuple[torch.Tensor, tuple]:
    """``(y, what the backward keeps)``; projections 0..n-2 are gate/up (one fused or two), the last is down."""
    dropped, masks = dropout_inputs(x, A[:-1], dropout_p[:-1])
    # Over NF4, a few rows take the fused NF4 GEMM in each projection, as lora_linear and lora_qkv do.
    gu, xa_gu = qkv_forward(x, gu_bases, biases[:-1], list(dropped), A[:-1], B[:-1], list(scaling[:-1]))
    h = call("glu_fwd", gu, activation)
    h_dropped, mask_h = dropout(h, dropout_p[-1], A[-1].dtype)
    y, xa_d = linear_forward(h, down_base, biases[-1], [h_dropped], A[-1:], B[-1:], [scaling[-1]], [None])
    return y, (gu, xa_gu, xa_d, mask_h, dropped, masks)


class LoRAMLPFunction(torch.autograd.Function):
    """``apply(x [M, K], gate_up bases, down base, activation, scalings, dropout_ps, n, *A, *B, *biases)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gu_bases: tuple[Base, ...], down_base: Base, activation: str,
                scaling: tuple[float, ...], dropout_p: tuple[float, ...], n: int,
                *tensors: torch.Tensor | None) -> torch.Tensor:
        A, B, biases = list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:])
        y, (gu, xa_gu, xa_d, mask_h, dropped, masks) = _forward(x, gu_bases, down_base, activation, scaling,
                                                                dropout_p, A, B, biases)
        ctx.gu_bases, ctx.down_base, ctx.activation = gu_bases, down_base, activation
        ctx.scaling, ctx.dropout_p, ctx.n, ctx.used = list(scaling), list(dropout_p), n, False
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        ctx.save_for_backward(x, gu, xa_gu, xa_d, mask_h, *[d if d is not x else None for d in dropped], *masks,
                              *A, *B)
        return y

    @staticmethod
    @autocast_off
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("lora_mlp: a second backward through the same graph is not supported (the saved "
                               "gate/up output is overwritten by its gradient); run the forward again")
        ctx.used = True
        n, m = ctx.n, ctx.n - 1
        x, gu, xa_gu, xa_d, mask_h, *rest = ctx.saved_tensors
        dropped = [x if d is None else d for d in rest[:m]]
        masks, A, B = rest[m:2 * m], rest[2 * m:2 * m + n], rest[2 * m + n:]
        cd, dy = dy.dtype, dy.contiguous()
        h = call("glu_fwd", gu, ctx.activation)  # recomputed, not stored
        p_h = ctx.dropout_p[-1]
        h_dropped = h if mask_h is None else (h.to(A[-1].dtype) * mask_h).mul_(1.0 / (1.0 - p_h)).to(cd)
        dh, d_a_down, d_b_down, _ = linear_backward(dy, ctx.down_base, xa_d, h, [h_dropped], [mask_h], A[-1:],
                                                    B[-1:], ctx.scaling[-1:], [p_h], [False], True)
        del h, h_dropped
        call("glu_bwd_", dh, gu, ctx.activation)  # gu now holds [d gate | d up]
        del dh
        need_dx = ctx.needs_input_grad[0]
        dx, d_a, d_b = qkv_backward(gu, ctx.gu_bases, xa_gu, x, dropped, list(masks), A[:-1], B[:-1],
                                    ctx.scaling[:-1], ctx.dropout_p[:-1], need_dx)
        needs = ctx.needs_input_grad[7:]
        grads = [g if need else None for g, need in zip([*d_a, *d_a_down, *d_b, *d_b_down], needs[:2 * n],
                                                        strict=True)]
        bias_grads = [gu[:, cols].sum(0, dtype=torch.float32) for cols in blocks([b.shape[0] for b in B[:-1]])] + \
            [dy.sum(0, dtype=torch.float32)]
        grads += [g.to(dt) if need else None for g, dt, need in zip(bias_grads, ctx.bias_dtypes, needs[2 * n:],
                                                                    strict=True)]
        return dx if need_dx else None, None, None, None, None, None, None, *grads


def lora_mlp(x: torch.Tensor, gate_up: Sequence[LoRAProjection], down: LoRAProjection, *,
             activation: str = "silu", compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A gated MLP with LoRA adapters: ``down(act(gate(x)) * up(x))``, each projection a ``lora_linear``.

    Equal to PEFT's LoRA layers on Llama-style (``gate_proj``, ``up_proj``, ``down_proj``) or Phi3-style (one
    ``gate_up_proj``, gate first) MLPs, in the output and in the gradients of x, every A, B and trainable bias,
    with less memory: the activation is recomputed in the backward.

    Args:
        x: ``[..., K]`` float32, float16 or bfloat16.
        gate_up: ``(gate, up)``, or ``(gate_up,)`` for a fused projection whose output is ``[gate | up]``.
        down: the down projection (its input is ``I`` wide).
        activation: ``"silu"`` (SwiGLU), ``"gelu_tanh"`` or ``"gelu"`` (GeGLU as Gemma's ``gelu_pytorch_tanh``
            and the exact one).
        compute_dtype: the GEMMs' dtype; default ``x.dtype``. The output is in ``x.dtype``. Under
            ``torch.autocast``: as :func:`fastlora.ops.lora.gemm_dtypes` says.

    Returns:
        ``[..., N_down]`` in ``x.dtype`` (or the autocast dtype).

    Example:
        >>> P = fastlora.LoRAProjection
        >>> y = fastlora.lora_mlp(h, [P(wg, ag, bg, 2.0), P(wu, au, bu, 2.0)], P(wd, ad, bd, 2.0))
    """
    projections = [*gate_up, down]
    if len(gate_up) not in (1, 2) or not all(isinstance(p, LoRAProjection) for p in projections):
        raise TypeError("lora_mlp: gate_up must be (gate, up) or (gate_up,) and down a LoRAProjection")
    if activation not in ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {ACTIVATIONS}, got {activation!r}")
    for p in gate_up:
        _check(x, p.base, [p.A], [p.B], [p.dropout_p], p.bias, [None])
    inner = sum(p.base.shape[0] for p in gate_up)
    if inner % 2 or (len(gate_up) == 2 and gate_up[0].base.shape[0] != gate_up[1].base.shape[0]):
        raise ValueError(f"lora_mlp: gate and up must have the same width; got {[p.base.shape[0] for p in gate_up]}")
    _check(torch.empty(0, inner // 2, device=x.device, dtype=x.dtype), down.base, [down.A], [down.B],
           [down.dropout_p], down.bias, [None])
    cd, out_dtype = gemm_dtypes("lora_mlp", x, compute_dtype)
    x2 = flat_input(x, cd)
    tensors = (*[p.A for p in projections], *[p.B for p in projections], *[p.bias for p in projections])
    args = (tuple(p.base for p in gate_up), down.base, activation, tuple(float(p.scaling) for p in projections),
            tuple(float(p.dropout_p) for p in projections), len(projections))
    with autocast_disabled(x.device):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, *tensors)):
            y = LoRAMLPFunction.apply(x2, *args, *tensors)
        else:
            n = len(projections)
            y, _ = _forward(x2, *args[:5], list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:]))
    return y.to(out_dtype).view(*x.shape[:-1], down.base.shape[0])
