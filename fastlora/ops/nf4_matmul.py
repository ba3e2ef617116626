"""A matmul with an NF4 weight read directly, and a low-rank term added in the same pass (LoRA's epilogue).

    nf4_matmul(x, w)               = x @ W^T        ``[M, K] -> [M, N]``
    nf4_matmul(x, w, trans=True)   = x @ W          ``[M, N] -> [M, K]`` (the backward's dX)
    ... + e1 @ e2^T (+ bias)

The stack: reference (dequantize, then GEMMs) -> ``fastlora::nf4_matmul`` -> :func:`nf4_matmul`. No autograd:
it is a building block of :func:`fastlora.lora_linear`, which takes it for small M (<= ``SMALL_M`` rows), where
a dense copy of the weight would cost more to write and read than the product itself.
"""

from __future__ import annotations

import torch

from ..dispatch import Backend, resolve_backend
from ..kernels._utils import empty
from ._autocast import autocast_dtype
from ._library import call, define
from .nf4 import nf4_dequantize_reference
from .nf4_weight import NF4Weight

_OP = "nf4_matmul"
#: The largest M that the fused kernel serves; above it, dequantize-then-GEMM keeps the tensor cores busier.
SMALL_M = 256
_Opt = torch.Tensor | None


def nf4_matmul_reference(x: torch.Tensor, weight: torch.Tensor, trans: bool = False, e1: _Opt = None,
                         e2: _Opt = None, bias: _Opt = None) -> torch.Tensor:
    """The maths on a dense ``weight [N, K]``, in ``x``'s dtype with torch's GEMMs."""
    out = torch.mm(x, weight if trans else weight.t())
    if e1 is not None:
        out.addmm_(e1, e2.t())
    return out if bias is None else out.add_(bias)


def _nf4_matmul(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, absmax_code: _Opt, absmax2: _Opt,
                offset: _Opt, blocksize: int, n: int, k: int, trans: bool, e1: _Opt, e2: _Opt, bias: _Opt,
                backend: str = "auto") -> torch.Tensor:
    b, _ = resolve_backend(_OP, x.device, x.dtype, backend)
    out = empty((x.shape[0], n if not trans else k), dtype=x.dtype, device=x.device)
    if b is Backend.TRITON:
        from ..kernels import nf4_matmul as kernels

        kernels.nf4_matmul(x, data, absmax, absmax_code, absmax2, offset, blocksize, n, k, out, trans_w=trans,
                           e1=e1, e2=e2, bias=bias)
        return out
    weight = nf4_dequantize_reference(data, absmax, absmax_code, absmax2, offset, blocksize, n * k, x.dtype)
    return out.copy_(nf4_matmul_reference(x, weight.view(n, k), trans, e1, e2, bias))


def _nf4_matmul_fake(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, absmax_code: _Opt, absmax2: _Opt,
                     offset: _Opt, blocksize: int, n: int, k: int, trans: bool, e1: _Opt, e2: _Opt, bias: _Opt,
                     backend: str = "auto") -> torch.Tensor:
    return x.new_empty((x.shape[0], n if not trans else k))


define("nf4_matmul(Tensor x, Tensor data, Tensor absmax, Tensor? absmax_code, Tensor? absmax2, Tensor? offset, "
       "int blocksize, int n, int k, bool trans, Tensor? e1, Tensor? e2, Tensor? bias, str backend='auto') -> Tensor",
       _nf4_matmul, _nf4_matmul_fake)


def nf4_matmul(x: torch.Tensor, w: NF4Weight, *, trans: bool = False, e1: _Opt = None, e2: _Opt = None,
               bias: _Opt = None, backend: Backend | str = "auto") -> torch.Tensor:
    """``x @ W^T`` (or ``x @ W`` with ``trans``) for an NF4 weight ``W [N, K]``, ``+ e1 @ e2^T``, ``+ bias``.

    Args:
        x: ``[M, K]`` (``[M, N]`` with ``trans``) float32, float16 or bfloat16, contiguous rows; sets the dtype
            (under ``torch.autocast``: the autocast dtype, to which x, e1, e2 and bias are cast).
        w: the NF4 weight, dequantized tile by tile to ``x``'s dtype (the values ``dequantize_nf4`` gives).
        e1, e2: an optional low-rank term, ``[M, R]`` and ``[P, R]`` (P the output's columns).
        bias: optional ``[P]``.

    Returns:
        ``[M, N]`` (``[M, K]`` with ``trans``) in that dtype.

    Example:
        >>> y = nf4_matmul(x, w, e1=x @ A.t(), e2=B * scaling)    # a QLoRA projection for a few tokens
    """
    n, k = w.shape
    p = k if trans else n
    if x.dim() != 2 or x.shape[1] != (n if trans else k):
        raise ValueError(f"nf4_matmul: x must be [M, {n if trans else k}] for a weight {tuple(w.shape)}"
                         f"{' (trans)' if trans else ''}, got {tuple(x.shape)}")
    if (e1 is None) != (e2 is None) or (e1 is not None and (e1.shape[0] != x.shape[0] or e2.shape[0] != p
                                                            or e1.shape[1] != e2.shape[1])):
        raise ValueError(f"nf4_matmul: e1 and e2 must be given together as [M, R] and [{p}, R]")
    if bias is not None and tuple(bias.shape) != (p,):
        raise ValueError(f"nf4_matmul: bias must be [{p}], got {tuple(bias.shape)}")
    name = backend.value if isinstance(backend, Backend) else str(backend).lower()
    autocast = autocast_dtype(x)
    if autocast is not None:
        # A GEMM under autocast runs in its dtype, as F.linear's does.
        x, e1, e2, bias = (t if t is None else t.to(autocast) for t in (x, e1, e2, bias))
    x = x if x.stride(-1) == 1 else x.contiguous()
    e1 = e1 if e1 is None or e1.stride(-1) == 1 else e1.contiguous()
    return call("nf4_matmul", x, w.data, w.absmax, w.absmax_code, w.absmax2, w.offset, w.blocksize, n,
                                         k, trans, e1, e2, bias, name)
