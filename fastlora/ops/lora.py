"""LoRA linear over a frozen dense or NF4 base: ``Y = X W^T (+ bias) + sum_i s_i (drop_i(X) A_i^T) B_i^T``.

The stack: reference (:func:`lora_linear_reference`) -> ``fastlora::lora_linear_fwd`` / ``lora_linear_bwd``
(cuBLAS GEMMs arranged so that the LoRA branch costs a few thin GEMMs on top of the base one) ->
:class:`LoRALinearFunction` -> :func:`lora_linear`.

How the work is arranged (M tokens, K in, N out, R the summed rank of the active adapters):
- forward: ``Y = X W^T`` then ``Y += XA (s B)^T`` accumulated by the GEMM itself (no ``[M, N]`` temporary);
  ``XA = [drop_1(X) A_1^T | ...]`` is ``[M, R]``, one GEMM for all adapters when none has dropout, and is saved.
- backward: ``dX = dY W`` then ``dX += G A`` (``G = dY (s B)``, ``[M, R]``) accumulated in place; ``dB = s dY^T XA``
  and ``dA = G^T drop(X)``: thin GEMMs. W gets no gradient.
- an NF4 base is dequantized once in the forward and once in the backward, into one workspace buffer shared by
  every layer of that shape, never kept between calls.
The LoRA branch runs in the compute dtype (the activations', ``compute_dtype``, or under ``torch.autocast`` its
dtype, as ``F.linear``) with fp32 accumulation in the GEMMs; adapters kept in fp32 (PEFT's default) are cast for
the GEMMs and get fp32 gradients. So with bf16 activations the branch has the precision PEFT's has under autocast
(HF Trainer's ``bf16=True``; the adapters' gradients were equal to PEFT's there bit for bit in a measured case),
not the fp32 one PEFT computes without autocast. Where that fp32 branch measures faster (skinny half-precision
GEMMs are slower than fp32 ones on some CPUs), the FP32_BRANCH variant runs it, with PEFT's numerics without
autocast (see :func:`variants`; measured by :mod:`fastlora.tuning`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..dispatch import Backend, would_run
from ..tuning import measured_variant
from ._autocast import autocast_disabled, autocast_dtype, autocast_off
from ._library import call, define
from ._workspace import workspace
from .nf4 import dequantize_nf4
from .nf4_matmul import SMALL_M, nf4_matmul
from .nf4_weight import NF4Weight

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, A: Sequence[torch.Tensor],
                          B: Sequence[torch.Tensor], scaling: Sequence[float], bias: torch.Tensor | None = None,
                          lora_bias: Sequence[torch.Tensor | None] | None = None,
                          dropped: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The op in plain differentiable PyTorch, every tensor in the dtype it comes in: the test oracle.

    ``dropped[i]`` is adapter i's input after its dropout (default ``x``); ``weight`` is the dense base ``[N, K]``.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    for i, (a, b, s) in enumerate(zip(A, B, scaling, strict=True)):
        xd = x if dropped is None else dropped[i]
        lb = None if lora_bias is None else lora_bias[i]
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(xd, a), b, lb) * s
    return y


def _same_input(x: torch.Tensor, dropped: Sequence[torch.Tensor]) -> bool:
    return all(d is x for d in dropped)


def _scaled_b(B: Sequence[torch.Tensor], scaling: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    # [N, R]: the adapters side by side, each times its scaling, in the compute dtype.
    return torch.cat([b.to(dtype) * s for b, s in zip(B, scaling, strict=True)], dim=1)


def _down(x: torch.Tensor, dropped: Sequence[torch.Tensor], A: Sequence[torch.Tensor],
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """``XA`` ``[M, R]`` in ``dtype`` (default ``x``'s): one GEMM when every adapter reads ``x`` itself."""
    cd = dtype or x.dtype
    if len(A) == 1:
        return torch.mm(dropped[0].to(cd), A[0].to(cd).t())
    if _same_input(x, dropped):
        return torch.mm(x.to(cd), torch.cat([a.to(cd) for a in A]).t())
    return torch.cat([torch.mm(d.to(cd), a.to(cd).t()) for d, a in zip(dropped, A, strict=True)], dim=1)


def _lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dropped: list[torch.Tensor],
                     A: list[torch.Tensor], B: list[torch.Tensor], scaling: list[float],
                     lora_bias: list[torch.Tensor | None],
                     branch_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    cd = x.dtype
    bd = branch_dtype or cd
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias.to(cd), x, weight.t())
    xa = _down(x, dropped, A, bd)
    # Each adapter's up-projection accumulates into Y, its scaling as the GEMM's alpha: no scaled copy of B. A
    # wider branch adds its term, rounded once (PEFT rounds it, then adds).
    for sl, b, s, lb in zip(_slices(A), B, scaling, lora_bias, strict=True):
        if bd == cd:
            y.addmm_(xa[:, sl], b.to(cd).t(), alpha=s)
        else:
            y.add_(torch.mm(xa[:, sl], b.to(bd).t()), alpha=s)
        if lb is not None:
            y.add_(lb.to(cd), alpha=s)
    return y, xa


def blocks(sizes: Sequence[int]) -> list[slice]:
    """Consecutive slices of the given sizes: each adapter's columns in ``XA``, each projection's in a stacked
    output or weight."""
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


def _slices(A: Sequence[torch.Tensor]) -> list[slice]:
    """Each adapter's columns in ``XA`` ``[M, R]``."""
    return blocks([a.shape[0] for a in A])


def dropout(t: torch.Tensor, p: float, dtype: torch.dtype,
            out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dropped t, mask)``, ``(t, None)`` for p = 0. Drawn in the adapter's ``dtype``, as PEFT casts before its
    dropout: the same random mask for the same RNG state. The result in ``out_dtype`` (default ``t``'s)."""
    if p == 0:
        return t, None
    out, mask = torch.native_dropout(t.to(dtype), p, True)
    return out.to(out_dtype or t.dtype), mask


def dropout_inputs(x: torch.Tensor, A: Sequence[torch.Tensor], dropout_p: Sequence[float],
                   variant: str | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Each adapter's input after its own dropout (kept in fp32 for the FP32_BRANCH ``variant``), and the masks."""
    out_dtype = branch_dtype(variant)
    pairs = [dropout(x, p, a.dtype, out_dtype) for a, p in zip(A, dropout_p, strict=True)]
    return [d for d, _ in pairs], [m for _, m in pairs]


def save_adapters(ctx: object, xa: torch.Tensor, x: torch.Tensor, dropped: Sequence[torch.Tensor],
                  masks: Sequence[torch.Tensor | None], A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]) -> None:
    """Save what an adapter backward needs; an undropped input is saved once, as ``x``."""
    ctx.save_for_backward(xa, x, *[d if d is not x else None for d in dropped], *masks, *A, *B)


def saved_adapters(ctx: object, n: int) -> tuple[torch.Tensor, torch.Tensor, list, list, list, list]:
    """``(xa, x, dropped, masks, A, B)`` as :func:`save_adapters` kept them, for ``n`` adapters."""
    xa, x, *rest = ctx.saved_tensors
    dropped = [x if d is None else d for d in rest[:n]]
    return xa, x, dropped, list(rest[n:2 * n]), list(rest[2 * n:3 * n]), list(rest[3 * n:])


def flat_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as ``[M, K]`` rows in ``dtype`` with a contiguous last dimension (a view when it already is)."""
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _lora_linear_fwd_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          dropped: list[torch.Tensor], A: list[torch.Tensor], B: list[torch.Tensor],
                          scaling: list[float], lora_bias: list[torch.Tensor | None],
                          branch_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    rank = sum(a.shape[0] for a in A)
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], rank), dtype=branch_dtype or x.dtype)


def _lora_linear_bwd(dy: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, x: torch.Tensor,
                     dropped: list[torch.Tensor], masks: list[torch.Tensor | None], A: list[torch.Tensor],
                     B: list[torch.Tensor], scaling: list[float], dropout_p: list[float], lora_bias: list[bool],
                     need_dx: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    cd, bd = dy.dtype, xa.dtype  # the branch ran in XA's dtype
    d_a, d_b, d_lb = [], [], []
    dy_sum = dy.sum(0, dtype=torch.float32) if any(lora_bias) else None
    dx = torch.mm(dy, weight) if need_dx else dy.new_empty((0,))
    dy_b, x_b = dy.to(bd), x.to(bd)
    for i, (sl, a, b, s) in enumerate(zip(_slices(A), A, B, scaling, strict=True)):
        g = torch.mm(dy_b, b.to(bd)).mul_(s)  # [M, r]: dY through s B
        d_b.append(torch.mm(dy_b.t(), xa[:, sl]).mul_(s).to(b.dtype))
        d_a.append(torch.mm(g.t(), x_b if dropped[i] is x else dropped[i].to(bd)).to(a.dtype))
        d_lb.append((dy_sum * s).to(b.dtype) if lora_bias[i] else b.new_empty((0,)))
        if need_dx:
            if masks[i] is None and bd == cd:
                dx.addmm_(g, a.to(cd))
            elif masks[i] is None:
                dx.add_(torch.mm(g, a.to(bd)))
            else:  # the dropout's backward: its mask, and 1 / (1 - p)
                dx.add_(torch.mm(g, a.to(bd)).mul_(masks[i]), alpha=1.0 / (1.0 - dropout_p[i]))
    return dx, d_a, d_b, d_lb


def _lora_linear_bwd_fake(dy: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, x: torch.Tensor,
                          dropped: list[torch.Tensor], masks: list[torch.Tensor | None], A: list[torch.Tensor],
                          B: list[torch.Tensor], scaling: list[float], dropout_p: list[float], lora_bias: list[bool],
                          need_dx: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                                                  list[torch.Tensor]]:
    dx = dy.new_empty((dy.shape[0], weight.shape[1]) if need_dx else (0,))
    d_lb = [dy.new_empty((b.shape[0],) if has else (0,), dtype=b.dtype) for b, has in zip(B, lora_bias, strict=True)]
    return dx, [a.new_empty(a.shape) for a in A], [b.new_empty(b.shape) for b in B], d_lb


define("lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor[] dropped, Tensor[] A, Tensor[] B, "
       "float[] scaling, Tensor?[] lora_bias, ScalarType? branch_dtype=None) -> (Tensor, Tensor)",
       _lora_linear_fwd, _lora_linear_fwd_fake)
define("lora_linear_bwd(Tensor dy, Tensor weight, Tensor xa, Tensor x, Tensor[] dropped, Tensor?[] masks, "
       "Tensor[] A, Tensor[] B, float[] scaling, float[] dropout_p, bool[] lora_bias, bool need_dx) "
       "-> (Tensor, Tensor[], Tensor[], Tensor[])", _lora_linear_bwd, _lora_linear_bwd_fake)


def _small_nf4(base: torch.Tensor | NF4Weight, x: torch.Tensor) -> bool:
    """Whether the fused NF4 GEMM serves these M rows (it needs its Triton kernel). A question, not a call: under
    ``use_backend("cpp")`` the answer is no, and the dequantize path runs on the C++ kernel."""
    return isinstance(base, NF4Weight) and x.shape[0] <= SMALL_M and \
        would_run("nf4_matmul", Backend.TRITON, x.device, x.dtype)


#: How a call can be computed. DENSE: GEMMs over the dense (or once dequantized) weight, the branch in the compute
#: dtype; FUSED_NF4: a few rows over NF4 in one kernel reading the packed weight; FP32_BRANCH: DENSE with the LoRA
#: branch in its fp32 adapters' dtype (PEFT's numerics without autocast; skinny half-precision GEMMs are slower
#: than fp32 ones on some CPUs).
DENSE, FUSED_NF4, FP32_BRANCH = "dense", "fused_nf4", "fp32_branch"


def variants(base: torch.Tensor | NF4Weight, x: torch.Tensor, A: Sequence[torch.Tensor]) -> list[str]:
    """The variants that can compute this call, the static choice first."""
    return variant_options(_small_nf4(base, x), x, A)


def variant_options(fused_nf4: bool, x: torch.Tensor, A: Sequence[torch.Tensor]) -> list[str]:
    """A LoRA layer op's variants, the static choice first: the fused NF4 GEMM where it serves the rows, and the
    fp32 branch where the adapters are fp32 beside half-precision activations."""
    out = [FUSED_NF4, DENSE] if fused_nf4 else [DENSE]
    if x.dtype != torch.float32 and all(a.dtype == torch.float32 for a in A):
        out.append(FP32_BRANCH)
    return out


def branch_dtype(variant: str | None) -> torch.dtype | None:
    """The LoRA branch's dtype for a variant (None: the compute dtype)."""
    return torch.float32 if variant == FP32_BRANCH else None


def _forward(x: torch.Tensor, base: torch.Tensor | NF4Weight, bias: torch.Tensor | None, dropped: list[torch.Tensor],
             A: list[torch.Tensor], B: list[torch.Tensor], scaling: list[float],
             lora_bias: list[torch.Tensor | None], variant: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, XA)`` by ``variant`` (default: the static choice)."""
    variant = variant or variants(base, x, A)[0]
    if variant != FUSED_NF4:
        return call("lora_linear_fwd", x, _dense(base, x.dtype), bias, dropped, A, B, scaling, lora_bias,
                    branch_dtype(variant))
    xa = _down(x, dropped, A)
    bias = None if bias is None else bias.to(x.dtype)
    y = nf4_matmul(x, base, e1=xa, e2=_scaled_b(B, scaling, x.dtype), bias=bias)
    for lb, s in zip(lora_bias, scaling, strict=True):
        if lb is not None:
            y.add_(lb.to(x.dtype), alpha=s)
    return y, xa


def _dense(base: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight ``[N, K]`` in the compute dtype; an NF4 one dequantized into the shared workspace."""
    if isinstance(base, NF4Weight):
        # Under torch.compile a fresh buffer: a workspace outside the graph would be a hidden global.
        out = None if torch.compiler.is_compiling() else workspace("lora_nf4", base.shape, dtype, base.device)
        return dequantize_nf4(base, dtype=dtype, out=out)
    return base.to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    """``apply(x [M, K], base, bias, scaling, dropout_p, n, variant, *A, *B, *lora_bias)``; returns ``[M, N]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: torch.Tensor | NF4Weight, bias: torch.Tensor | None,
                scaling: tuple[float, ...], dropout_p: tuple[float, ...], n: int, variant: str,
                *adapters: torch.Tensor | None) -> torch.Tensor:
        A, B, lora_bias = list(adapters[:n]), list(adapters[n:2 * n]), list(adapters[2 * n:])
        dropped, masks = dropout_inputs(x, A, dropout_p, variant)
        y, xa = _forward(x, base, bias, dropped, A, B, list(scaling), lora_bias, variant)
        ctx.base, ctx.n, ctx.scaling, ctx.dropout_p = base, n, list(scaling), list(dropout_p)
        ctx.variant = variant
        ctx.has_lora_bias = [lb is not None for lb in lora_bias]
        ctx.bias_dtype = None if bias is None else bias.dtype
        save_adapters(ctx, xa, x, dropped, masks, A, B)
        return y

    @staticmethod
    @autocast_off
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n = ctx.n
        xa, x, dropped, masks, A, B = saved_adapters(ctx, n)
        dy = dy.contiguous()
        need_dx = ctx.needs_input_grad[0]
        dx, d_a, d_b, d_lb = _backward(dy, ctx.base, xa, x, dropped, masks, A, B, ctx.scaling, ctx.dropout_p,
                                       ctx.has_lora_bias, need_dx, ctx.variant)
        needs = ctx.needs_input_grad[7:]
        grads = [g if need else None for g, need in zip([*d_a, *d_b], needs[:2 * n], strict=True)]
        grads += [g if has and need else None for g, has, need in zip(d_lb, ctx.has_lora_bias, needs[2 * n:],
                                                                       strict=True)]
        # A trainable base bias (PEFT's bias="all") is cheap to serve; the base weight never is.
        d_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx if need_dx else None, None, d_bias, None, None, None, None, *grads


def _backward(dy: torch.Tensor, base: torch.Tensor | NF4Weight, xa: torch.Tensor, x: torch.Tensor,
              dropped: list[torch.Tensor], masks: list[torch.Tensor | None], A: list[torch.Tensor],
              B: list[torch.Tensor], scaling: list[float], dropout_p: list[float], has_lora_bias: list[bool],
              need_dx: bool, variant: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                  list[torch.Tensor], list[torch.Tensor]]:
    """``(dX, dA, dB, d lora_bias)`` of one layer by the forward's ``variant`` (default: the static choice): dX over
    the dense (or once dequantized) weight, or for a few rows over NF4 from the packed weight
    (:func:`_small_nf4_dx`); the branch in ``xa``'s dtype."""
    small = need_dx and (variant == FUSED_NF4 if variant else _small_nf4(base, dy))
    weight = _dense(base, dy.dtype) if need_dx and not small else dy.new_empty((0, 0))
    dx, d_a, d_b, d_lb = call("lora_linear_bwd", dy, weight, xa, x, dropped, masks, A, B, scaling, dropout_p,
                              has_lora_bias, need_dx and not small)
    if small:
        dx = _small_nf4_dx(dy, base, masks, A, B, scaling, dropout_p)
    return dx, d_a, d_b, d_lb


def _small_nf4_dx(dy: torch.Tensor, base: NF4Weight, masks: list[torch.Tensor | None], A: list[torch.Tensor],
                  B: list[torch.Tensor], scaling: list[float], dropout_p: list[float]) -> torch.Tensor:
    """``dX = dY W + sum_i drop_i'(G_i A_i)`` over NF4 for a few rows: the adapters without dropout ride in the
    kernel's epilogue; one with dropout needs its mask applied to its own term."""
    cd = dy.dtype
    plain = [i for i, m in enumerate(masks) if m is None]
    g = torch.mm(dy, _scaled_b([B[i] for i in plain], [scaling[i] for i in plain], cd)) if plain else None
    a_t = torch.cat([A[i].to(cd) for i in plain]).t() if plain else None
    dx = nf4_matmul(dy, base, trans=True, e1=g, e2=a_t)
    for i, mask in enumerate(masks):
        if mask is not None:
            g_i = torch.mm(dy, B[i].to(cd)).mul_(scaling[i])
            dx.add_(torch.mm(g_i, A[i].to(cd)).mul_(mask), alpha=1.0 / (1.0 - dropout_p[i]))
    return dx


def _as_list(value: object, n: int, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"lora_linear: {what} has {len(value)} entries for {n} adapters")
        return list(value)
    return [value] * n


def lora_linear(x: torch.Tensor, base: torch.Tensor | NF4Weight, A: torch.Tensor | Sequence[torch.Tensor],
                B: torch.Tensor | Sequence[torch.Tensor], scaling: float | Sequence[float], *,
                bias: torch.Tensor | None = None, dropout_p: float | Sequence[float] = 0.0,
                lora_bias: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A linear layer with a frozen base and LoRA adapters: ``X W^T + bias + sum_i s_i (drop_i(X) A_i^T) B_i^T``.

    Equal to PEFT's LoRA ``Linear`` (and its bitsandbytes ``Linear4bit``) for the same adapters, in the forward and
    in the gradients of ``x``, every ``A_i``, ``B_i`` and ``lora_bias_i`` (and ``bias``, if it requires grad).
    ``base`` gets no gradient. In half precision the LoRA branch runs in the activations' dtype, as PEFT's does
    under autocast; PEFT without autocast computes it in its fp32 adapters' dtype, more precisely.

    Args:
        x: ``[..., K]`` float32, float16 or bfloat16.
        base: the frozen weight ``[N, K]``: a tensor, or an :class:`NF4Weight` (``NF4Weight.from_bnb`` reads a
            bitsandbytes ``Params4bit`` or ``Linear4bit``).
        A: ``[r, K]`` per adapter (a tensor, or a list for several active adapters; ranks may differ).
        B: ``[N, r]`` per adapter.
        scaling: per adapter (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        bias: the base layer's ``[N]`` bias.
        dropout_p: the LoRA dropout per adapter: applied to that adapter's input only, with torch's RNG (pass 0
            in eval mode, as ``nn.Dropout`` would).
        lora_bias: ``[N]`` bias of ``lora_B`` per adapter (PEFT's ``lora_bias=True``), or None.
        compute_dtype: the GEMMs' dtype (a 4-bit layer's ``compute_dtype``); default ``x.dtype``. Under
            ``torch.autocast`` the autocast dtype is used instead, as by ``F.linear`` (see :func:`gemm_dtypes`).

    Returns:
        ``[..., N]`` in ``x.dtype`` (under autocast without ``compute_dtype``: the autocast dtype).

    Example:
        >>> y = fastlora.lora_linear(x, layer.base_layer.weight, layer.lora_A["default"].weight,
        ...                          layer.lora_B["default"].weight, layer.scaling["default"])   # [B, S, N]
    """
    n = len(A) if isinstance(A, (list, tuple)) else 1
    As, Bs = _as_list(A, n, "A"), _as_list(B, n, "B")
    scalings = [float(s) for s in _as_list(scaling, n, "scaling")]
    ps = [float(p) for p in _as_list(dropout_p, n, "dropout_p")]
    lbs = _as_list(lora_bias, n, "lora_bias")
    _check(x, base, As, Bs, ps, bias, lbs)
    cd, out_dtype = gemm_dtypes("lora_linear", x, compute_dtype)
    out_features = base.shape[0]
    x2 = flat_input(x, cd)
    tensors = (x2, bias, *As, *Bs, *lbs)
    with autocast_disabled(x.device):
        train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        variant = _variant(x2, base, bias, As, Bs, scalings, ps, lbs, train)
        if train:
            y = LoRALinearFunction.apply(x2, base, bias, tuple(scalings), tuple(ps), n, variant, *As, *Bs, *lbs)
        else:
            dropped, _ = dropout_inputs(x2, As, ps, variant)
            y, _ = _forward(x2, base, bias, dropped, As, Bs, scalings, lbs, variant)
    return y.to(out_dtype).view(*x.shape[:-1], out_features)


def _variant(x: torch.Tensor, base: torch.Tensor | NF4Weight, bias: torch.Tensor | None, A: list[torch.Tensor],
             B: list[torch.Tensor], scaling: list[float], dropout_p: list[float],
             lora_bias: list[torch.Tensor | None], train: bool) -> str:
    """The variant this call of ``lora_linear`` runs (:func:`measured_variant`)."""
    has_lb = [lb is not None for lb in lora_bias]

    def run(variant: str, grad: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        dropped, masks = dropout_inputs(x, A, dropout_p, variant)
        y, xa = _forward(x, base, bias, dropped, A, B, scaling, lora_bias, variant)
        if grad is None:
            return (y,)
        dx, d_a, d_b, _ = _backward(grad(y), base, xa, x, dropped, masks, A, B, scaling, dropout_p, has_lb, True,
                                    variant)
        return (y, dx, *d_a, *d_b)

    shape = (type(base), *base.shape, *((a.shape[0], a.dtype) for a in A))
    return measured_variant("lora_linear", x, shape, lambda: variants(base, x, A), run, train)


def gemm_dtypes(op: str, x: torch.Tensor, compute_dtype: torch.dtype | None) -> tuple[torch.dtype, torch.dtype]:
    """``(the GEMMs' dtype, the output's)`` for a layer-like op on ``x``.

    Without autocast: ``compute_dtype`` (default ``x.dtype``), output in ``x.dtype``. Under ``torch.autocast`` on
    ``x``'s device its dtype wins, as it does for ``F.linear``; the output is then in that dtype too (a dense
    layer's under autocast), or in ``x.dtype`` when ``compute_dtype`` was given (a bitsandbytes 4-bit layer casts
    its output back to its input's dtype).

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     gemm_dtypes("lora_linear", torch.ones(2, 2), None)
        (torch.bfloat16, torch.bfloat16)
    """
    if compute_dtype is not None and compute_dtype not in _FLOATS:
        raise TypeError(f"{op}: compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
    autocast = autocast_dtype(x)
    cd = autocast or compute_dtype or x.dtype
    return cd, autocast if autocast is not None and compute_dtype is None else x.dtype


def _check(x: torch.Tensor, base: torch.Tensor | NF4Weight, A: list, B: list, dropout_p: list[float],
           bias: torch.Tensor | None, lora_bias: list) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"lora_linear: x must be a float32, float16 or bfloat16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if isinstance(base, torch.Tensor):
        if base.dim() != 2 or base.dtype not in _FLOATS:
            raise TypeError(f"lora_linear: base must be a 2-D float tensor [N, K] or an NF4Weight, got "
                            f"{base.dtype} {tuple(base.shape)}")
        if base.requires_grad and torch.is_grad_enabled():
            raise ValueError("lora_linear: base requires grad, but the base weight is frozen here (it gets no "
                             "gradient); detach it or train it with a plain linear")
    elif not isinstance(base, NF4Weight):
        raise TypeError(f"lora_linear: base must be a tensor or an NF4Weight, got {type(base).__name__}")
    n_out, k = base.shape
    if x.shape[-1] != k:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features, base expects {k} ([N, K] = {tuple(base.shape)})")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"lora_linear: bias must be [{n_out}], got {tuple(bias.shape)}")
    for i, (a, b, p, lb) in enumerate(zip(A, B, dropout_p, lora_bias, strict=True)):
        where = f"adapter {i}" if len(A) > 1 else "the adapter"
        if not all(isinstance(t, torch.Tensor) and t.dtype in _FLOATS for t in (a, b)):
            raise TypeError(f"lora_linear: A and B of {where} must be float tensors")
        if a.dim() != 2 or a.shape[1] != k or b.dim() != 2 or b.shape != (n_out, a.shape[0]):
            raise ValueError(f"lora_linear: {where} has A {tuple(a.shape)} and B {tuple(b.shape)}; expected A [r, {k}] "
                             f"and B [{n_out}, r]")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"lora_linear: dropout_p of {where} must be in [0, 1), got {p}")
        if lb is not None and tuple(lb.shape) != (n_out,):
            raise ValueError(f"lora_linear: lora_bias of {where} must be [{n_out}], got {tuple(lb.shape)}")
        if len({t.device for t in (x, a, b)} | {base.device}) != 1:
            raise ValueError(f"lora_linear: x, base and {where} must be on one device")
