"""Cross-entropy with the logits' gradient computed in the forward, over any vocabulary, with no host sync.

The stack: reference -> registered ops (``fastlora::cross_entropy_fwd`` returns the per-row losses and the
gradient; ``fastlora::cross_entropy_fwd_`` writes the gradient over the logits) -> autograd.Function ->
:func:`cross_entropy`. The reduction's scale (1 / count for a mean, 1 / num_items_in_batch, 1 for a sum) is a
device tensor folded into the gradient during the forward, so the backward only multiplies by grad_output.
"""

from __future__ import annotations

import torch

from ..dispatch import Backend, resolve_backend
from ..kernels._utils import empty
from ._library import call, define

_OP = "cross_entropy"
_BACKENDS = frozenset(b.value for b in Backend)
_REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                            reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                            softcap: float | None = None,
                            num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """:func:`cross_entropy` written with torch's own ops, differentiable, in the logits' dtype (upcast them for
    the fp32 oracle). Used by the tests and the benchmarks, independent of the per-row formula below."""
    x = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    flat, flat_labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    valid = flat_labels != ignore_index
    rows = torch.nn.functional.cross_entropy(flat, flat_labels, ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing)
    if z_loss:
        rows = rows + torch.where(valid, z_loss * torch.logsumexp(flat, -1) ** 2, 0.0)
    if num_items_in_batch is not None:
        return rows.sum() / num_items_in_batch
    if reduction == "none":
        return rows.view(labels.shape)
    return rows.sum() / valid.sum() if reduction == "mean" else rows.sum()


def cross_entropy_rows_reference(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                                 label_smoothing: float, z_loss: float, softcap: float | None,
                                 want_grad: bool,
                                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row fp32 losses ``[N]`` and, if wanted, the fp32 gradient ``[N, V]`` times ``scale`` (``[]`` or
    ``[N]``), in ``out`` when given (fp32, may be ``logits``): the kernel's formulas (module docstring of
    ``fastlora.kernels.cross_entropy``) in PyTorch, and the CPU path, so it works in place on its buffers.

    A label outside ``[0, V)`` (and not ``ignore_index``) gives a NaN loss and a NaN gradient for its row.
    """
    x = logits.float()
    if softcap is not None:
        x = torch.tanh(x / softcap).mul_(softcap)
    n, v = x.shape
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    hit = valid & in_range
    safe = torch.where(hit, labels, 0)
    if not (label_smoothing or z_loss or softcap is not None):
        return _plain_rows(x, safe, valid, in_range, hit, scale, want_grad, out)
    lse = torch.logsumexp(x, dim=-1)
    rows = (1 - label_smoothing) * (lse - x.gather(1, safe.unsqueeze(1)).squeeze(1)) + z_loss * lse * lse
    if label_smoothing:
        rows += label_smoothing * (lse - x.mean(-1))
    rows = torch.where(valid, torch.where(in_range, rows, float("nan")), 0.0)
    if not want_grad:
        return rows, None
    # x is only read again for the soft-cap, and then it is a new tensor: out may be the logits.
    grad = torch.sub(x, lse.unsqueeze(1), out=out).exp_()  # softmax
    if z_loss:
        grad.mul_((1 + 2 * z_loss * lse).unsqueeze(1))
    if label_smoothing:
        grad.sub_(label_smoothing / v)
    rows_hit = torch.arange(n, device=x.device)
    grad.index_put_((rows_hit, safe), torch.where(hit, label_smoothing - 1, 0.0), accumulate=True)
    if softcap is not None:
        grad.mul_(1 - (x / softcap) ** 2)
    return rows, grad.mul_(_row_scale(scale, valid, in_range))


def _row_scale(scale: torch.Tensor, valid: torch.Tensor, in_range: torch.Tensor) -> torch.Tensor:
    """``[N, 1]``: each row's gradient factor. Ignored rows get 0, not 0 * scale (a mean over no valid row has an
    infinite scale); a label out of range gets NaN, as its loss (torch would raise; this does not sync)."""
    return torch.where(valid, torch.where(in_range, scale, float("nan")), 0.0).unsqueeze(1)


def _plain_rows(x: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor, in_range: torch.Tensor, hit: torch.Tensor,
                scale: torch.Tensor, want_grad: bool,
                out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows without smoothing, z-loss or soft-cap from one log-softmax: half the ops of the general formula (on
    a CPU, where each op is a pass over ``[N, V]``, 2x faster at a small vocabulary)."""
    logp = torch.log_softmax(x, dim=-1)
    rows = logp.gather(1, safe.unsqueeze(1)).squeeze(1).neg_()
    rows = torch.where(valid, torch.where(in_range, rows, float("nan")), 0.0)
    if not want_grad:
        return rows, None
    grad = torch.exp(logp, out=out) if out is not None else logp.exp_()  # softmax
    grad.scatter_add_(1, safe.unsqueeze(1), torch.where(hit, -1.0, 0.0).unsqueeze(1))
    return rows, grad.mul_(_row_scale(scale, valid, in_range))


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor | None,
                       ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
                       backend: str) -> torch.Tensor:
    """Per-row fp32 losses ``[N]`` of ``logits [N, V]``, and the gradient times ``scale`` (``[]`` or ``[N]`` fp32)
    into ``grad`` (``[N, V]``, may be ``logits`` itself) unless it is None. Shared with the fused linear loss."""
    n = logits.shape[0]
    loss = empty((n,), dtype=torch.float32, device=logits.device)
    b, _ = resolve_backend(_OP, logits.device, logits.dtype, backend)
    if b is Backend.TRITON:
        from ..kernels import cross_entropy as kernels

        lse = empty((n,), dtype=torch.float32, device=logits.device)
        kernels.cross_entropy_fwd(logits, labels, scale, grad, loss, lse, ignore_index=ignore_index,
                                  label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        return loss
    direct = grad is not None and grad.dtype == torch.float32
    rows, g = cross_entropy_rows_reference(logits, labels, scale, ignore_index, label_smoothing, z_loss, softcap,
                                           grad is not None, out=grad if direct else None)
    if grad is not None and not direct:
        grad.copy_(g)
    return loss.copy_(rows)


def _cross_entropy_fwd(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float | None, write_grad: bool,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    grad = empty(logits.shape if write_grad else (0,), dtype=logits.dtype, device=logits.device)
    loss = cross_entropy_rows(logits, labels, scale, grad if write_grad else None, ignore_index, label_smoothing,
                              z_loss, softcap, backend)
    return loss, grad


def _cross_entropy_fwd_fake(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                            label_smoothing: float, z_loss: float, softcap: float | None, write_grad: bool,
                            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    grad = logits.new_empty(logits.shape if write_grad else (0,))
    return logits.new_empty((logits.shape[0],), dtype=torch.float32), grad


def _cross_entropy_fwd_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                        label_smoothing: float, z_loss: float, softcap: float | None,
                        backend: str = "auto") -> torch.Tensor:
    return cross_entropy_rows(logits, labels, scale, logits, ignore_index, label_smoothing, z_loss, softcap, backend)


def _cross_entropy_fwd_fake_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                             label_smoothing: float, z_loss: float, softcap: float | None,
                             backend: str = "auto") -> torch.Tensor:
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


_ARGS = "Tensor labels, Tensor scale, int ignore_index, float label_smoothing, float z_loss, float? softcap"
define(f"cross_entropy_fwd(Tensor logits, {_ARGS}, bool write_grad, str backend='auto') -> (Tensor, Tensor)",
       _cross_entropy_fwd, _cross_entropy_fwd_fake)
define(f"cross_entropy_fwd_(Tensor(a!) logits, {_ARGS}, str backend='auto') -> Tensor", _cross_entropy_fwd_,
       _cross_entropy_fwd_fake_)


def reduce_rows(rows: torch.Tensor, scale: torch.Tensor, reduction: str) -> torch.Tensor:
    """The loss from per-row losses: ``rows.sum() * scale``, or the rows themselves for ``"none"``."""
    return rows if reduction == "none" else rows.sum() * scale


class CrossEntropyFunction(torch.autograd.Function):
    """Takes ``logits [..., V]`` whole and flattens inside: autograd cannot mark a view dirty in a Function that
    returns two outputs, so in place mode needs the caller's tensor itself."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                label_smoothing: float, z_loss: float, softcap: float | None, reduction: str, inplace: bool,
                backend: str) -> tuple[torch.Tensor, ...]:
        options = (ignore_index, label_smoothing, z_loss, softcap)
        flat = logits.view(-1, logits.shape[-1])
        if inplace:
            rows = call("cross_entropy_fwd_", flat, labels, scale, *options, backend)
            grad = logits  # not the view: a view made here cannot be saved once its base is dirty
            ctx.mark_dirty(logits)
        else:
            rows, grad = call("cross_entropy_fwd", flat, labels, scale, *options, True, backend)
        ctx.save_for_backward(grad)
        ctx.reduction, ctx.shape, ctx.used = reduction, logits.shape, False
        loss = reduce_rows(rows, scale, reduction)
        return (loss, logits) if inplace else (loss,)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("cross_entropy: a second backward through the same loss is not supported (the "
                               "stored gradient is scaled in place); recompute the loss instead")
        ctx.used = True
        grad = ctx.saved_tensors[0].view(-1, ctx.shape[-1])
        factor = grad_loss.unsqueeze(1) if ctx.reduction == "none" else grad_loss
        # The buffer is fastlora's own (or the logits the caller gave up): scaling it in place costs no memory.
        grad = grad.mul_(factor.to(grad.dtype)).view(ctx.shape)
        return grad, None, None, None, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                  num_items_in_batch: torch.Tensor | int | None = None, inplace_backward: bool = False,
                  validate: bool = False, backend: Backend | str = "auto") -> torch.Tensor:
    """Cross-entropy over any vocabulary size in fp32, with the logits' gradient computed in the forward.

    Args:
        logits: ``[..., V]`` float32, float16 or bfloat16, rows contiguous (the labels are already shifted).
        labels: ``[...]`` integer class indices; ``ignore_index`` rows contribute nothing.
        reduction: ``"mean"`` (over rows not ignored), ``"sum"`` or ``"none"`` (a loss per row, fp32).
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        z_loss: adds ``z_loss * logsumexp(x)^2`` per row.
        softcap: logits become ``softcap * tanh(logits / softcap)`` first (Gemma2's final soft-capping).
        num_items_in_batch: divide the summed loss by this (HF Trainer's gradient accumulation); overrides
            ``reduction``, as in transformers.
        inplace_backward: write the gradient over ``logits`` (saves a ``[N, V]`` buffer; the logits are gone
            after the call, and autograd knows they were modified).
        validate: raise a ValueError, as torch does, for a label outside ``[0, V)`` that is not ``ignore_index``.
            It reads the labels on the host (a sync on a GPU, a graph break under torch.compile): off by default,
            when such a label gives its row a NaN loss and a NaN gradient instead.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        A 0-dim fp32 loss, or ``[...]`` fp32 with ``reduction="none"``.

    Example:
        >>> loss = fastlora.cross_entropy(logits.view(-1, V), shift_labels.view(-1))   # logits [N, V] bf16
        >>> loss.backward()
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("cross_entropy: logits and labels must be tensors")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"cross_entropy: logits has dtype {logits.dtype}, expected float32, float16 or bfloat16")
    if labels.dtype not in (torch.int64, torch.int32) or labels.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: labels must be int64 or int32 of shape {tuple(logits.shape[:-1])}, got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"cross_entropy: labels are on {labels.device}, logits on {logits.device}")
    name = check_options("cross_entropy", reduction, label_smoothing, z_loss, softcap, backend)
    if validate:
        check_labels("cross_entropy", labels, logits.shape[-1], ignore_index)
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        if not logits.is_contiguous():
            raise ValueError("cross_entropy: inplace_backward needs contiguous logits")
        # (Dynamo cannot trace _is_view; under compile, AOTAutograd handles the view itself.)
        if not torch.compiler.is_compiling() and logits._is_view():
            raise ValueError("cross_entropy: inplace_backward cannot overwrite a view of another tensor (autograd "
                             "forbids it here); pass the lm_head's output itself, or inplace_backward=False")
    elif logits.stride(-1) != 1 or not _rows_viewable(logits):
        logits = logits.contiguous()  # the kernel needs [N, V] with contiguous rows: one copy
    flat_labels = labels.reshape(-1).long()
    scale = loss_scale(flat_labels, ignore_index, reduction, num_items_in_batch, logits.device)
    if num_items_in_batch is not None:
        reduction = "sum"
    options = (ignore_index, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap))
    if torch.is_grad_enabled() and logits.requires_grad:
        out = CrossEntropyFunction.apply(logits, flat_labels, scale, *options, reduction, inplace_backward, name)
        loss = out[0]
    else:
        flat = logits.view(-1, logits.shape[-1])
        rows, _ = call("cross_entropy_fwd", flat, flat_labels, scale, *options, False, name)
        loss = reduce_rows(rows, scale, reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def _rows_viewable(t: torch.Tensor) -> bool:
    try:
        t.view(-1, t.shape[-1])
    except RuntimeError:
        return False
    return True


def check_labels(op: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError naming the first label outside ``[0, vocab)`` that is not ``ignore_index`` (a host sync)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{op}: label {int(labels[where])} at {where} is outside [0, {vocab}) and is not "
                         f"ignore_index ({ignore_index})")


def check_options(op: str, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
                  backend: Backend | str) -> str:
    """Validates the loss options shared by the cross-entropy ops; returns the backend's name."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0:
        raise ValueError(f"{op}: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: softcap must be positive or None, got {softcap}")
    name = backend.value if isinstance(backend, Backend) else str(backend).lower()
    if name not in _BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r} (expected one of {', '.join(sorted(_BACKENDS))})")
    return name


def loss_scale(labels: torch.Tensor, ignore_index: int, reduction: str, num_items_in_batch: torch.Tensor | int | None,
               device: torch.device) -> torch.Tensor:
    """The reduction's factor as a 0-dim fp32 device tensor: 1 / num_items_in_batch, 1 / (valid rows) for a mean,
    else 1."""
    # A device tensor: dividing by the count of valid labels must not wait for it on the host.
    if num_items_in_batch is not None:
        return 1.0 / torch.as_tensor(num_items_in_batch, device=device, dtype=torch.float32)
    if reduction == "mean":
        return 1.0 / (labels != ignore_index).sum().to(torch.float32)
    return torch.ones((), device=device, dtype=torch.float32)
