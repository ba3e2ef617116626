"""Fused linear cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without the ``[N, V]`` logits.

Tokens go through in chunks sized from a memory budget. Per chunk: one GEMM makes the chunk's logits, the
cross-entropy kernel turns them into per-row losses and overwrites them with their gradient, and GEMMs take that
gradient to ``hidden`` (always, when it requires grad) and to ``weight``/``bias`` (only when they require grad:
a frozen lm_head, the LoRA case, costs no dW work). Everything happens in the forward; for a reduced loss the
backward only multiplies by ``grad_output``. With ``reduction="none"`` each row's ``grad_output`` is only known in
the backward, so the forward computes losses alone and the backward runs the chunks again with those factors.

The stack: reference (:func:`linear_cross_entropy_reference`) -> ``fastlora::fused_linear_cross_entropy``
(composite of cuBLAS GEMMs and the cross-entropy kernel, with a fake) -> autograd.Function ->
:func:`fused_linear_cross_entropy`. The backend argument picks the cross-entropy kernel.
"""

from __future__ import annotations

import torch

from ..dispatch import Backend
from ..kernels._utils import empty
from ._autocast import autocast_disabled, autocast_dtype, autocast_off
from ._library import call, define
from .cross_entropy import (
    check_labels,
    check_options,
    cross_entropy_reference,
    cross_entropy_rows,
    loss_scale,
    reduce_rows,
)

DEFAULT_CHUNK_BYTES = 256 * 2**20


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                                   softcap: float | None = None,
                                   num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """The unfused loss in fp32 through autograd (materialises the logits): the oracle for tests and benchmarks."""
    logits = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return cross_entropy_reference(logits, labels, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                   num_items_in_batch=num_items_in_batch)


def chunk_rows(n: int, vocab: int, itemsize: int, max_chunk_bytes: int) -> int:
    """Tokens per chunk: as many as keep one chunk's logits within ``max_chunk_bytes`` (at least 1)."""
    rows = max(1, max_chunk_bytes // max(1, vocab * itemsize))
    if rows >= 256:
        rows -= rows % 128  # whole GEMM tiles
    return min(n, rows)


def _flce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
          scale: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
          grad_hidden: bool, grad_weight: bool, grad_bias: bool, max_chunk_bytes: int,
          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, vocab = hidden.shape[0], weight.shape[0]
    write_grad = grad_hidden or grad_weight or grad_bias
    rows = empty((n,), dtype=torch.float32, device=hidden.device)
    d_hidden = empty(hidden.shape if grad_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    # dW and db accumulate over chunks in fp32; a weight in fp16/bf16 gets its own dtype once at the end.
    acc = torch.float32
    d_weight = torch.zeros(weight.shape if grad_weight else (0,), dtype=acc, device=weight.device)
    d_bias = torch.zeros((vocab,) if grad_bias else (0,), dtype=acc, device=hidden.device)
    step = max(1, chunk_rows(n, vocab, hidden.element_size(), max_chunk_bytes))
    logits_buf = torch.empty((step, vocab), dtype=hidden.dtype, device=hidden.device)
    # A chunk's dW in the weight's dtype before it joins the fp32 sum (cuBLAS has no mixed-output GEMM on CPU).
    dw_chunk = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) \
        if grad_weight and weight.dtype != acc else None
    for start in range(0, n, step):
        end = min(n, start + step)
        h = hidden[start:end]
        logits = logits_buf[:end - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        chunk_scale = scale[start:end] if scale.dim() else scale
        # The gradient overwrites the chunk's logits: they are not needed once the losses are known.
        rows[start:end] = cross_entropy_rows(logits, labels[start:end], chunk_scale, logits if write_grad else None,
                                             ignore_index, label_smoothing, z_loss, softcap, backend)
        if grad_hidden:
            torch.mm(logits, weight, out=d_hidden[start:end])
        if grad_weight:
            if dw_chunk is None:
                d_weight.addmm_(logits.t(), h)
            else:
                d_weight.add_(torch.mm(logits.t(), h, out=dw_chunk))
        if grad_bias:
            d_bias.add_(logits.sum(0, dtype=acc))
    return rows, d_hidden, d_weight.to(weight.dtype), d_bias.to(hidden.dtype if bias is None else bias.dtype)


def _flce_fake(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               scale: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
               grad_hidden: bool, grad_weight: bool, grad_bias: bool, max_chunk_bytes: int,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = hidden.new_empty((hidden.shape[0],), dtype=torch.float32)
    d_hidden = hidden.new_empty(hidden.shape if grad_hidden else (0,))
    d_weight = weight.new_empty(weight.shape if grad_weight else (0,))
    d_bias = hidden.new_empty((weight.shape[0],) if grad_bias else (0,),
                              dtype=hidden.dtype if bias is None else bias.dtype)
    return rows, d_hidden, d_weight, d_bias


define("fused_linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor scale, "
       "int ignore_index, float label_smoothing, float z_loss, float? softcap, bool grad_hidden, bool grad_weight, "
       "bool grad_bias, int max_chunk_bytes, str backend='auto') -> (Tensor, Tensor, Tensor, Tensor)",
       _flce, _flce_fake)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                scale: torch.Tensor, options: tuple, reduction: str, max_chunk_bytes: int,
                backend: str) -> torch.Tensor:
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.reduction, ctx.needs, ctx.used = reduction, needs, False
        ctx.options, ctx.max_chunk_bytes, ctx.backend = options, max_chunk_bytes, backend
        if reduction == "none":
            rows, *_ = call("fused_linear_cross_entropy", hidden, weight, bias, labels, scale, *options, False,
                            False, False, max_chunk_bytes, backend)
            ctx.save_for_backward(hidden, weight, bias, labels)
            return rows
        rows, d_hidden, d_weight, d_bias = call("fused_linear_cross_entropy", hidden, weight, bias, labels, scale,
                                                *options, *needs, max_chunk_bytes, backend)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        return reduce_rows(rows, scale, reduction)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("fused_linear_cross_entropy: a second backward through the same loss is not "
                               "supported (the stored gradients are scaled in place); recompute the loss instead")
        ctx.used = True
        if ctx.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            _, d_hidden, d_weight, d_bias = call(
                "fused_linear_cross_entropy", hidden, weight, bias, labels, grad_loss.float().contiguous(),
                *ctx.options, *ctx.needs, ctx.max_chunk_bytes, ctx.backend)
        else:
            # The buffers are fastlora's own: scaling them in place costs no memory.
            d_hidden, d_weight, d_bias = (g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors)
        grads = [g if need else None for g, need in zip((d_hidden, d_weight, d_bias), ctx.needs, strict=True)]
        return *grads, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                               num_items_in_batch: torch.Tensor | int | None = None,
                               max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, validate: bool = False,
                               backend: Backend | str = "auto") -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, without materialising the logits.

    Equal to ``cross_entropy(F.linear(hidden, weight, bias), labels, ...)`` (the options are those of
    :func:`fastlora.cross_entropy`), but only one chunk of ``max_chunk_bytes`` of logits exists at a time, and the
    gradients are computed in the forward: the extra memory is that chunk plus ``hidden``'s gradient (and, for
    a trainable head, an fp32 ``[V, H]`` accumulator).

    Args:
        hidden: ``[..., H]`` float32, float16 or bfloat16 (the final norm's output; labels already shifted).
        weight: ``[V, H]`` the lm_head weight, same dtype as ``hidden``. Its gradient is computed only when it
            requires grad. Under ``torch.autocast`` both are cast to its dtype first, as ``F.linear`` would be.
        labels: ``[...]`` int64 or int32; ``ignore_index`` rows contribute nothing.
        bias: optional ``[V]``.
        max_chunk_bytes: memory budget of one chunk of logits; fixes the number of tokens per chunk.
        validate: raise a ValueError for a label out of range, as torch does (a host sync; see
            :func:`fastlora.cross_entropy`); off, such a label gives a NaN loss and NaN gradients.

    Returns:
        A 0-dim fp32 loss, or ``[...]`` fp32 with ``reduction="none"``.

    Example:
        >>> h = model.model(input_ids).last_hidden_state                           # [B, S, H] bf16
        >>> loss = fastlora.fused_linear_cross_entropy(h[:, :-1], model.lm_head.weight, input_ids[:, 1:])
        >>> loss.backward()                                                         # no [B, S, V] logits
    """
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, labels)):
        raise TypeError("fused_linear_cross_entropy: hidden, weight and labels must be tensors")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused_linear_cross_entropy: hidden has dtype {hidden.dtype}, expected float32, float16 "
                        "or bfloat16")
    autocast = autocast_dtype(hidden)
    if autocast is not None:
        # The lm_head this stands in for is an F.linear, which autocast runs in its dtype; the loss stays fp32.
        hidden, weight = hidden.to(autocast), weight.to(autocast)
        bias = None if bias is None else bias.to(autocast)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"fused_linear_cross_entropy: weight ({weight.dtype}) and bias must have hidden's dtype "
                        f"({hidden.dtype})")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused_linear_cross_entropy: weight must be [V, {hidden.shape[-1]}] to match hidden "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fused_linear_cross_entropy: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.dtype not in (torch.int64, torch.int32) or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_linear_cross_entropy: labels must be int64 or int32 of shape "
                         f"{tuple(hidden.shape[:-1])}, got {labels.dtype} {tuple(labels.shape)}")
    if len({t.device for t in (hidden, weight, labels) + (() if bias is None else (bias,))}) != 1:
        raise ValueError("fused_linear_cross_entropy: hidden, weight, bias and labels must be on one device")
    if not isinstance(max_chunk_bytes, int) or max_chunk_bytes <= 0:
        raise ValueError(f"fused_linear_cross_entropy: max_chunk_bytes must be a positive int, got {max_chunk_bytes!r}")
    name = check_options("fused_linear_cross_entropy", reduction, label_smoothing, z_loss, softcap, backend)
    if validate:
        check_labels("fused_linear_cross_entropy", labels, weight.shape[0], ignore_index)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    flat_labels = labels.reshape(-1).long()
    scale = loss_scale(flat_labels, ignore_index, reduction, num_items_in_batch, hidden.device)
    if num_items_in_batch is not None:
        reduction = "sum"
    options = (ignore_index, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap))
    with autocast_disabled(hidden.device):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
            loss = FusedLinearCrossEntropyFunction.apply(flat, weight, bias, flat_labels, scale, options,
                                                         reduction, max_chunk_bytes, name)
        else:
            rows, *_ = call("fused_linear_cross_entropy", flat, weight, bias, flat_labels, scale, *options, False,
                            False, False, max_chunk_bytes, name)
            loss = reduce_rows(rows, scale, reduction)
    return loss.view(labels.shape) if reduction == "none" else loss

