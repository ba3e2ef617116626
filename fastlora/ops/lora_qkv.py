"""The q, k and v projections of one input, each with one LoRA adapter, as one op.

X is read once: one GEMM makes the three down-projections ``XA = X [A_q; A_k; A_v]^T`` (``[M, 3r]``) when no
adapter has dropout. The outputs are column blocks of one ``[M, Nq + Nk + Nv]`` tensor, so that their gradients
arrive as one ``dY``. Over NF4 the three weights are dequantized into one ``[Nq + Nk + Nv, K]`` workspace and each
direction is a single GEMM, except for a few rows (``lora_linear``'s small-M case): then each projection is one
:func:`fastlora.nf4_matmul` reading its packed weight, with its LoRA term in the kernel's epilogue. Dense weights
take one GEMM each, written into (and read from) the column blocks.
The LoRA term of ``dX`` is one GEMM for the three adapters: ``[G_q | G_k | G_v] [A_q; A_k; A_v]``.

The stack: reference (:func:`lora_qkv_reference`) -> ``fastlora::lora_qkv_fwd`` / ``lora_qkv_bwd`` ->
:class:`LoRAQKVFunction` -> :func:`lora_qkv`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..kernels._utils import empty
from ..tuning import measured_variant
from ._autocast import autocast_disabled, autocast_off
from ._library import call, define
from ._workspace import workspace
from .lora import (
    FUSED_NF4,
    _check,
    _down,
    _scaled_b,
    _slices,
    _small_nf4,
    _small_nf4_dx,
    blocks,
    branch_dtype,
    dropout_inputs,
    flat_input,
    gemm_dtypes,
    lora_linear_reference,
    save_adapters,
    saved_adapters,
    variant_options,
)
from .nf4 import dequantize_nf4
from .nf4_matmul import nf4_matmul
from .nf4_weight import NF4Weight

Base = torch.Tensor | NF4Weight


def lora_qkv_reference(x: torch.Tensor, weights: Sequence[torch.Tensor], A: Sequence[torch.Tensor],
                       B: Sequence[torch.Tensor], scaling: Sequence[float],
                       biases: Sequence[torch.Tensor | None] = (None, None, None),
                       dropped: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The three projections with plain differentiable PyTorch: the test oracle."""
    return [lora_linear_reference(x, w, [a], [b], [s], bias, dropped=None if dropped is None else [dropped[i]])
            for i, (w, a, b, s, bias) in enumerate(zip(weights, A, B, scaling, biases, strict=True))]


def _lora_qkv_fwd(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                  dropped: list[torch.Tensor], A: list[torch.Tensor], B: list[torch.Tensor],
                  scaling: list[float], branch_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    cd = x.dtype
    bd = branch_dtype or cd
    out_cols = blocks([b.shape[0] for b in B])
    if len(weights) == 1:  # the three weights stacked: one GEMM
        y = torch.mm(x, weights[0].t())
    else:
        y = empty((x.shape[0], out_cols[-1].stop), dtype=cd, device=x.device)
        for cols, w in zip(out_cols, weights, strict=True):
            torch.mm(x, w.t(), out=y[:, cols])
    xa = _down(x, dropped, A, bd)
    for cols, sl, b, s, bias in zip(out_cols, _slices(A), B, scaling, biases, strict=True):
        if bd == cd:
            y[:, cols].addmm_(xa[:, sl], b.to(cd).t(), alpha=s)
        else:  # a wider branch's term, rounded once
            y[:, cols].add_(torch.mm(xa[:, sl], b.to(bd).t()), alpha=s)
        if bias is not None:
            y[:, cols].add_(bias.to(cd))
    return y, xa


def _lora_qkv_fwd_fake(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                       dropped: list[torch.Tensor], A: list[torch.Tensor], B: list[torch.Tensor],
                       scaling: list[float],
                       branch_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = sum(b.shape[0] for b in B)
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], sum(a.shape[0] for a in A)),
                                                     dtype=branch_dtype or x.dtype)


def _lora_qkv_bwd(dy: torch.Tensor, weights: list[torch.Tensor], xa: torch.Tensor, x: torch.Tensor,
                  dropped: list[torch.Tensor], masks: list[torch.Tensor | None], A: list[torch.Tensor],
                  B: list[torch.Tensor], scaling: list[float], dropout_p: list[float],
                  need_dx: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    cd, bd = dy.dtype, xa.dtype  # the branch ran in XA's dtype
    out_cols = blocks([b.shape[0] for b in B])
    d_a, d_b, gs = [], [], []
    dy_b, x_b = dy.to(bd), x.to(bd)
    for cols, sl, a, b, s, d in zip(out_cols, _slices(A), A, B, scaling, dropped, strict=True):
        g = torch.mm(dy_b[:, cols], b.to(bd)).mul_(s)  # [M, r]
        gs.append(g)
        d_b.append(torch.mm(dy_b[:, cols].t(), xa[:, sl]).mul_(s).to(b.dtype))
        d_a.append(torch.mm(g.t(), x_b if d is x else d.to(bd)).to(a.dtype))
    if not need_dx:
        return dy.new_empty((0,)), d_a, d_b
    if len(weights) == 1:
        dx = torch.mm(dy, weights[0])
    else:
        dx = torch.mm(dy[:, out_cols[0]], weights[0])
        for cols, w in zip(out_cols[1:], weights[1:], strict=True):
            dx.addmm_(dy[:, cols], w)
    if all(m is None for m in masks) and bd == cd:
        dx.addmm_(torch.cat(gs, dim=1), torch.cat([a.to(cd) for a in A]))
    elif all(m is None for m in masks):
        dx.add_(torch.mm(torch.cat(gs, dim=1), torch.cat([a.to(bd) for a in A])))
    else:
        for g, a, mask, p in zip(gs, A, masks, dropout_p, strict=True):
            if mask is None and bd == cd:
                dx.addmm_(g, a.to(cd))
            elif mask is None:
                dx.add_(torch.mm(g, a.to(bd)))
            else:
                dx.add_(torch.mm(g, a.to(bd)).mul_(mask), alpha=1.0 / (1.0 - p))
    return dx, d_a, d_b


def _lora_qkv_bwd_fake(dy: torch.Tensor, weights: list[torch.Tensor], xa: torch.Tensor, x: torch.Tensor,
                       dropped: list[torch.Tensor], masks: list[torch.Tensor | None], A: list[torch.Tensor],
                       B: list[torch.Tensor], scaling: list[float], dropout_p: list[float],
                       need_dx: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    dx = dy.new_empty((dy.shape[0], x.shape[1]) if need_dx else (0,))
    return dx, [a.new_empty(a.shape) for a in A], [b.new_empty(b.shape) for b in B]


define("lora_qkv_fwd(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor[] dropped, Tensor[] A, Tensor[] B, "
       "float[] scaling, ScalarType? branch_dtype=None) -> (Tensor, Tensor)", _lora_qkv_fwd, _lora_qkv_fwd_fake)
define("lora_qkv_bwd(Tensor dy, Tensor[] weights, Tensor xa, Tensor x, Tensor[] dropped, Tensor?[] masks, "
       "Tensor[] A, Tensor[] B, float[] scaling, float[] dropout_p, bool need_dx) -> (Tensor, Tensor[], Tensor[])",
       _lora_qkv_bwd, _lora_qkv_bwd_fake)


def _weights(bases: Sequence[Base], dtype: torch.dtype) -> list[torch.Tensor]:
    """Dense weights in ``dtype`` (a copy only where they are in another, as under autocast); NF4 ones dequantized
    into the rows of one shared ``[sum N, K]`` workspace."""
    if not all(isinstance(b, NF4Weight) for b in bases):
        return [b.to(dtype) if isinstance(b, torch.Tensor) else dequantize_nf4(b, dtype=dtype) for b in bases]
    shape = (sum(b.shape[0] for b in bases), bases[0].shape[1])
    stacked = torch.empty(shape, dtype=dtype, device=bases[0].device) if torch.compiler.is_compiling() else \
        workspace("lora_qkv_nf4", shape, dtype, bases[0].device)
    for rows, b in zip(blocks([b.shape[0] for b in bases]), bases, strict=True):
        dequantize_nf4(b, dtype=dtype, out=stacked[rows])
    return [stacked]


def _small(bases: Sequence[Base], x: torch.Tensor) -> bool:
    """Whether the fused NF4 GEMM serves these rows for every projection (as it would each alone)."""
    return all(_small_nf4(b, x) for b in bases)


def variants(bases: Sequence[Base], x: torch.Tensor, A: Sequence[torch.Tensor]) -> list[str]:
    """The variants that can compute this call, the static choice first (as :func:`fastlora.ops.lora.variants`)."""
    return variant_options(_small(bases, x), x, A)


def _forward(x: torch.Tensor, bases: Sequence[Base], biases: list[torch.Tensor | None], dropped: list[torch.Tensor],
             A: list[torch.Tensor], B: list[torch.Tensor], scaling: list[float],
             variant: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, XA)`` by ``variant`` (default: the static choice): GEMMs over the dense (or once dequantized) weights,
    or for a few rows over NF4 one kernel per projection reading its packed weight, X read once for the
    down-projections either way."""
    variant = variant or variants(bases, x, A)[0]
    if variant != FUSED_NF4:
        return call("lora_qkv_fwd", x, _weights(bases, x.dtype), biases, dropped, A, B, scaling,
                    branch_dtype(variant))
    cd = x.dtype
    xa = _down(x, dropped, A)
    out_cols = blocks([b.shape[0] for b in B])
    y = empty((x.shape[0], out_cols[-1].stop), dtype=cd, device=x.device)
    for cols, sl, base, b, s, bias in zip(out_cols, _slices(A), bases, B, scaling, biases, strict=True):
        y[:, cols] = nf4_matmul(x, base, e1=xa[:, sl], e2=_scaled_b([b], [s], cd),
                                bias=None if bias is None else bias.to(cd))
    return y, xa


def _backward(dy: torch.Tensor, bases: Sequence[Base], xa: torch.Tensor, x: torch.Tensor,
              dropped: list[torch.Tensor], masks: list[torch.Tensor | None], A: list[torch.Tensor],
              B: list[torch.Tensor], scaling: list[float], dropout_p: list[float],
              need_dx: bool, variant: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                  list[torch.Tensor]]:
    """``(dX, dA, dB)`` by the forward's ``variant`` (default: the static choice): dX over the dense (or once
    dequantized) weights, or for a few rows over NF4 the sum of the projections' ``dY_i W_i`` and LoRA terms, each
    read from its packed weight; the branch in ``xa``'s dtype."""
    small = need_dx and (variant == FUSED_NF4 if variant else _small(bases, dy))
    weights = _weights(bases, dy.dtype) if need_dx and not small else []
    dx, d_a, d_b = call("lora_qkv_bwd", dy, weights, xa, x, dropped, masks, A, B, scaling, dropout_p,
                        need_dx and not small)
    if small:
        dx = None
        for i, cols in enumerate(blocks([b.shape[0] for b in B])):
            term = _small_nf4_dx(dy[:, cols], bases[i], [masks[i]], [A[i]], [B[i]], [scaling[i]],
                                 [dropout_p[i]])
            dx = term if dx is None else dx.add_(term)
    return dx, d_a, d_b


class LoRAQKVFunction(torch.autograd.Function):
    """``apply(x [M, K], bases, dropout_p, scaling, variant, *A, *B, *biases)`` -> ``[M, Nq + Nk + Nv]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bases: tuple[Base, ...], dropout_p: tuple[float, ...],
                scaling: tuple[float, ...], variant: str, *tensors: torch.Tensor | None) -> torch.Tensor:
        n = len(bases)
        A, B, biases = list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:])
        dropped, masks = dropout_inputs(x, A, dropout_p, variant)
        y, xa = _forward(x, bases, biases, dropped, A, B, list(scaling), variant)
        ctx.bases, ctx.scaling, ctx.dropout_p, ctx.n = bases, list(scaling), list(dropout_p), n
        ctx.variant = variant
        ctx.bias_dtypes = [None if bias is None else bias.dtype for bias in biases]
        save_adapters(ctx, xa, x, dropped, masks, A, B)
        return y

    @staticmethod
    @autocast_off
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n = ctx.n
        xa, x, dropped, masks, A, B = saved_adapters(ctx, n)
        dy = dy.contiguous()
        need_dx = ctx.needs_input_grad[0]
        dx, d_a, d_b = _backward(dy, ctx.bases, xa, x, dropped, masks, A, B, ctx.scaling, ctx.dropout_p, need_dx,
                                 ctx.variant)
        needs = ctx.needs_input_grad[5:]
        grads = [g if need else None for g, need in zip([*d_a, *d_b], needs[:2 * n], strict=True)]
        for cols, dtype, need in zip(blocks([b.shape[0] for b in B]), ctx.bias_dtypes, needs[2 * n:],
                                     strict=True):
            grads.append(dy[:, cols].sum(0, dtype=torch.float32).to(dtype) if need else None)
        return dx if need_dx else None, None, None, None, None, *grads


def lora_qkv(x: torch.Tensor, bases: Sequence[Base], A: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
             scaling: Sequence[float], *, biases: Sequence[torch.Tensor | None] | None = None,
             dropout_p: Sequence[float] | float = 0.0,
             compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """q, k and v (any number of projections of one input), each ``lora_linear`` with one adapter, in one op.

    Equal to ``[lora_linear(x, bases[i], A[i], B[i], scaling[i], bias=biases[i], dropout_p=dropout_p[i])]``, with
    X read once for the down-projections and, over NF4 bases, one GEMM per direction for the three weights.

    Args:
        x: ``[..., K]`` float32, float16 or bfloat16.
        bases: the frozen weights ``[N_i, K]``: tensors or :class:`NF4Weight` (all NF4 to share one GEMM).
        A, B: one adapter per projection, ``[r_i, K]`` and ``[N_i, r_i]``.
        scaling: per projection.
        biases: the base layers' biases (Qwen2 has q/k/v biases), or None.
        dropout_p: per projection (each has its own mask, as PEFT's per-layer dropouts do).
        compute_dtype: the GEMMs' dtype; default ``x.dtype``. The outputs are in ``x.dtype``. Under
            ``torch.autocast``: as :func:`fastlora.ops.lora.gemm_dtypes` says.

    Returns:
        One ``[..., N_i]`` tensor per projection: column blocks of one buffer (views with a row stride of
        ``sum N_i``), which ``.view(B, S, H, D)`` accepts as HF's attention does.

    Example:
        >>> q, k, v = fastlora.lora_qkv(h, [wq, wk, wv], [aq, ak, av], [bq, bk, bv], [2.0, 2.0, 2.0])
    """
    n = len(bases)
    biases = [None] * n if biases is None else list(biases)
    ps = [float(dropout_p)] * n if isinstance(dropout_p, (int, float)) else [float(p) for p in dropout_p]
    if not (len(A) == len(B) == len(scaling) == len(biases) == len(ps) == n) or n == 0:
        raise ValueError(f"lora_qkv: bases, A, B, scaling, biases and dropout_p need one entry per projection; got "
                         f"{n}, {len(A)}, {len(B)}, {len(scaling)}, {len(biases)}, {len(ps)}")
    for i in range(n):
        _check(x, bases[i], [A[i]], [B[i]], [ps[i]], biases[i], [None])
    cd, out_dtype = gemm_dtypes("lora_qkv", x, compute_dtype)
    x2 = flat_input(x, cd)
    tensors = (*A, *B, *biases)
    scalings = [float(s) for s in scaling]
    with autocast_disabled(x.device):
        train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, *tensors))
        variant = _variant(x2, bases, biases, list(A), list(B), scalings, ps, train)
        if train:
            y = LoRAQKVFunction.apply(x2, tuple(bases), tuple(ps), tuple(scalings), variant, *tensors)
        else:
            dropped, _ = dropout_inputs(x2, A, ps, variant)
            y, _ = _forward(x2, bases, biases, dropped, list(A), list(B), scalings, variant)
    y = y.to(out_dtype)
    return tuple(y[:, cols].view(*x.shape[:-1], cols.stop - cols.start)
                 for cols in blocks([b.shape[0] for b in B]))


def _variant(x: torch.Tensor, bases: Sequence[Base], biases: list[torch.Tensor | None], A: list[torch.Tensor],
             B: list[torch.Tensor], scaling: list[float], dropout_p: list[float], train: bool) -> str:
    """The variant this call of ``lora_qkv`` runs (:func:`fastlora.tuning.measured_variant`)."""
    def run(variant: str, grad: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        dropped, masks = dropout_inputs(x, A, dropout_p, variant)
        y, xa = _forward(x, bases, biases, dropped, A, B, scaling, variant)
        if grad is None:
            return (y,)
        dx, d_a, d_b = _backward(grad(y), bases, xa, x, dropped, masks, A, B, scaling, dropout_p, True, variant)
        return (y, dx, *d_a, *d_b)

    shape = (type(bases[0]), x.shape[1], *((b.shape[0], a.shape[0], a.dtype) for a, b in zip(A, B, strict=True)))
    return measured_variant("lora_qkv", x, shape, lambda: variants(bases, x, A), run, train)
