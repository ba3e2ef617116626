"""Rotary position embedding: a drop-in for transformers' ``apply_rotary_pos_emb``.

The stack: reference -> registered ops (``fastlora::rope`` out of place, ``fastlora::rope_`` in place, both with
a ``backward`` flag that applies the transposed rotation) -> autograd.Function -> :func:`apply_rope`.
cos and sin are inputs, so one kernel serves every rope type (default, llama3, linear, dynamic, yarn, ...).
"""

from __future__ import annotations

import torch

from ..dispatch import Backend, resolve_backend
from ..kernels._utils import empty_like_strided
from ._library import call, define

_OP = "rope"
_BACKENDS = frozenset(b.value for b in Backend)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, backward: bool,
            dtype: torch.dtype) -> torch.Tensor:
    rot = cos.shape[-1]
    c = cos.unsqueeze(head_dim).float()
    s = sin.unsqueeze(head_dim).float()
    xr = x[..., :rot].float()
    x1, x2 = xr.chunk(2, dim=-1)
    # rotate_half(x) = [-x2, x1]; its transpose, for the gradient, is [x2, -x1].
    half = rot // 2
    if backward:
        turned = torch.cat((x2 * s[..., half:], -x1 * s[..., :half]), -1)
    else:
        turned = torch.cat((-x2, x1), -1) * s
    y = (xr * c + turned).to(dtype)
    return torch.cat((y, x[..., rot:].to(dtype)), -1) if rot < x.shape[-1] else y


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int = 1,
                   backward: bool = False,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotation in fp32, rounded once to ``dtype`` (default q's; the oracle and the TORCH backend).

    With ``backward`` it applies the transpose, mapping the outputs' gradients to the inputs'.
    """
    dtype = dtype or q.dtype
    return _rotate(q, cos, sin, head_dim, backward, dtype), _rotate(k, cos, sin, head_dim, backward, dtype)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, backward: bool,
          backend: str = "auto", dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b, _ = resolve_backend(_OP, q.device, q.dtype, backend)
    # Outputs keep the inputs' memory layout (HF's [B, S, H, D] storage behind a [B, H, S, D] view).
    q_out, k_out = empty_like_strided(q, dtype=dtype), empty_like_strided(k, dtype=dtype)
    if b is Backend.TRITON:
        from ..kernels import rope as kernels

        kernels.rope(q, k, cos, sin, q_out, k_out, head_dim=head_dim, backward=backward)
        return q_out, k_out
    q_ref, k_ref = rope_reference(q, k, cos, sin, head_dim, backward, q_out.dtype)
    return q_out.copy_(q_ref), k_out.copy_(k_ref)


def _rope_fake(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
               backward: bool, backend: str = "auto",
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q, dtype=dtype or q.dtype), torch.empty_like(k, dtype=dtype or k.dtype)


def _rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, backward: bool,
           backend: str = "auto") -> None:
    b, _ = resolve_backend(_OP, q.device, q.dtype, backend)
    if b is Backend.TRITON:
        from ..kernels import rope as kernels

        kernels.rope(q, k, cos, sin, q, k, head_dim=head_dim, backward=backward)
        return
    q_new, k_new = rope_reference(q, k, cos, sin, head_dim, backward)
    q.copy_(q_new)
    k.copy_(k_new)


def _rope_fake_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                backward: bool, backend: str = "auto") -> None:
    return None


_ARGS = "Tensor cos, Tensor sin, int head_dim, bool backward, str backend='auto'"
define(f"rope(Tensor q, Tensor k, {_ARGS}, ScalarType? dtype=None) -> (Tensor, Tensor)", _rope, _rope_fake)
define(f"rope_(Tensor(a!) q, Tensor(b!) k, {_ARGS}) -> ()", _rope_, _rope_fake_)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                inplace: bool, backend: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.head_dim, ctx.backend, ctx.in_dtype = head_dim, backend, q.dtype
        if inplace:
            call("rope_", q, k, cos, sin, head_dim, False, backend)
            ctx.mark_dirty(q, k)
            return q, k
        return call("rope", q, k, cos, sin, head_dim, False, backend, dtype)

    @staticmethod
    def backward(ctx, dq: torch.Tensor | None, dk: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        dq, dk = _last_dim_contiguous(dq), _last_dim_contiguous(dk)
        # The gradients arrive in the (maybe promoted) output dtype and leave in q's and k's, rounded once.
        gq, gk = call("rope", dq, dk, cos, sin, ctx.head_dim, True, ctx.backend, ctx.in_dtype)
        return gq, gk, None, None, None, None, None, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: torch.Tensor | None = None, unsqueeze_dim: int = 1, *, inplace: bool = False,
               backend: Backend | str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the rotary position embedding: transformers' ``apply_rotary_pos_emb``, fused.

    Args:
        q: ``[B, Hq, S, D]`` when ``unsqueeze_dim=1`` (HF's transposed view is read in place, no copy), or
            ``[B, S, Hq, D]`` when ``unsqueeze_dim=2``; float32, float16 or bfloat16.
        k: the same layout with ``Hk`` heads (GQA: ``Hk`` may differ from ``Hq``), q's dtype.
        cos, sin: ``[B or 1, S, R]`` in the half-split layout, as HF's rotary embeddings make them, any rope type;
            float32, float16 or bfloat16, not necessarily q's (under autocast q and k are bf16, cos and sin fp32).
            ``R <= D``: only the first ``R`` features rotate (partial rotary, as in Phi3). No gradient flows to them.
        position_ids: unused, as in transformers (its old signature had it); pass ``unsqueeze_dim`` by keyword.
        unsqueeze_dim: 1 or 2, as in transformers.
        inplace: rotate q and k in their own memory (declared to autograd) instead of returning new tensors. They
            keep their dtype, as torch's in-place ops do (``q.mul_(cos)``): with fp32 cos and bf16 q the result is
            then bf16, not the fp32 that transformers (and ``inplace=False``) return.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(q_rotated, k_rotated)`` with the shapes of q and k, in ``torch.promote_types(q.dtype, cos.dtype)``
        (and sin's), as transformers' ``q * cos + rotate_half(q) * sin`` gives: bf16 q with fp32 cos and sin
        give fp32. The gradients of q and k come back in their own dtype. With ``inplace``, q and k themselves.

    Example:
        >>> cos, sin = model.model.rotary_emb(hidden, position_ids)      # [B, S, D]
        >>> q, k = fastlora.apply_rope(q, k, cos, sin)                   # q [B, 32, S, 128], k [B, 8, S, 128]
    """
    if position_ids is not None and not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"apply_rope: position_ids is unused and must be a tensor or None, got {position_ids!r}; "
                        "pass unsqueeze_dim by keyword")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"apply_rope: {name} must be a tensor, got {type(t).__name__}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"apply_rope: unsqueeze_dim must be 1 ([B, H, S, D]) or 2 ([B, S, H, D]), got {unsqueeze_dim}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be 4-D, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype:
        raise TypeError(f"apply_rope: q and k must share a float32, float16 or bfloat16 dtype, got {q.dtype} and "
                        f"{k.dtype}")
    seq_dim = 3 - unsqueeze_dim
    B, S, D = q.shape[0], q.shape[seq_dim], q.shape[-1]
    if (k.shape[0], k.shape[seq_dim], k.shape[-1]) != (B, S, D):
        raise ValueError(f"apply_rope: k has shape {tuple(k.shape)}, which does not match q's {tuple(q.shape)} in "
                         "batch, sequence or head size")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    rot = cos.shape[-1]
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1] != S:
        raise ValueError(f"apply_rope: cos and sin must be [{B} or 1, {S}, R], got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if rot % 2 or rot > D or rot == 0:
        raise ValueError(f"apply_rope: the rotary size R = cos.shape[-1] = {rot} must be even and at most D = {D}")
    if cos.device != q.device or sin.device != q.device or k.device != q.device:
        raise ValueError(f"apply_rope: q, k, cos and sin must be on one device, got {q.device}, {k.device}, "
                         f"{cos.device}, {sin.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"apply_rope: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    # transformers' q * cos + rotate_half(q) * sin promotes: a drop-in returns the dtype the original does.
    dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("apply_rope: cos and sin require grad, but no gradient flows to them (they come from "
                         "the rotary embedding's buffers); detach them")
    name = backend.value if isinstance(backend, Backend) else str(backend).lower()
    if name not in _BACKENDS:
        raise ValueError(f"apply_rope: unknown backend {backend!r} (expected one of {', '.join(sorted(_BACKENDS))})")
    # cos and sin are small ([B, S, R]); q and k are only copied if their last dimension is strided.
    cos, sin = cos.contiguous(), sin.contiguous()
    if inplace and (q.stride(-1) != 1 or k.stride(-1) != 1):
        raise ValueError("apply_rope: inplace needs q and k with a contiguous last dimension")
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    if inplace or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim, inplace, name, dtype)
    return call("rope", q, k, cos, sin, unsqueeze_dim, False, name, dtype)
