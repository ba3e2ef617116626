"""NF4 dequantization: the reference, the registered ops that run the chosen backend, and the functional API.

``fastlora::nf4_dequantize`` returns a new flat tensor; ``fastlora::nf4_dequantize_out`` writes into a given one
(declared as mutated). Both take the weight's tensors and sizes, so torch.compile sees plain tensors. The
backend is resolved inside the op at run time. Dequantization has no gradient: NF4 weights are frozen.
"""

from __future__ import annotations

import torch

from ..dispatch import Backend
from ..kernels._utils import empty
from ..tuning import choose
from ._library import call, define
from .nf4_weight import ABSMAX_BLOCKSIZE, NF4_CODE, NF4Weight

_OP = "nf4_dequantize"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ARGS = ("Tensor data, Tensor absmax, Tensor? absmax_code, Tensor? absmax2, Tensor? offset, int blocksize, "
         "int numel")


def decode_absmax(absmax: torch.Tensor, absmax_code: torch.Tensor | None, absmax2: torch.Tensor | None,
                  offset: torch.Tensor | None) -> torch.Tensor:
    """fp32 scales of the first level: as stored, or decoded from double quantization (multiply, then add)."""
    if absmax_code is None:
        return absmax
    second = absmax2.repeat_interleave(ABSMAX_BLOCKSIZE)[: absmax.numel()]
    return absmax_code[absmax.long()] * second + offset


def nf4_dequantize_reference(data: torch.Tensor, absmax: torch.Tensor, absmax_code: torch.Tensor | None,
                             absmax2: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, numel: int,
                             dtype: torch.dtype) -> torch.Tensor:
    """The flat ``[numel]`` weight in ``dtype``: ``NF4[nibble] * absmax`` in fp32, rounded once. The oracle."""
    scales = decode_absmax(absmax, absmax_code, absmax2, offset)
    nibbles = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:numel]
    values = torch.tensor(NF4_CODE, device=data.device)[nibbles.long()]
    return (values * scales.repeat_interleave(blocksize)[:numel]).to(dtype)


_Opt = torch.Tensor | None


def _run(data: torch.Tensor, absmax: torch.Tensor, absmax_code: _Opt, absmax2: _Opt, offset: _Opt, blocksize: int,
         numel: int, out: torch.Tensor, backend: str) -> None:
    def into_new(b: Backend) -> torch.Tensor:  # a candidate timed on its own output, not the caller's
        fresh = torch.empty_like(out)
        _run_on(b, data, absmax, absmax_code, absmax2, offset, blocksize, numel, fresh)
        return fresh

    # Every backend decodes the same bytes to the same values: the self-check is equality.
    b = choose(_OP, data.device, out.dtype, backend, numel, into_new, torch.equal)
    _run_on(b, data, absmax, absmax_code, absmax2, offset, blocksize, numel, out)


def _run_on(b: Backend, data: torch.Tensor, absmax: torch.Tensor, absmax_code: _Opt, absmax2: _Opt, offset: _Opt,
            blocksize: int, numel: int, out: torch.Tensor) -> None:
    if b is Backend.TRITON:
        from ..kernels import nf4 as kernels

        kernels.nf4_dequantize(data, absmax, absmax_code, absmax2, offset, blocksize, numel, out)
    elif b in (Backend.CPP, Backend.CUDA):
        torch.ops.fastlora.native_nf4_dequantize(data, absmax, absmax_code, absmax2, offset, blocksize, numel, out)
    else:
        out.copy_(nf4_dequantize_reference(data, absmax, absmax_code, absmax2, offset, blocksize, numel, out.dtype))


def _nf4_dequantize(data: torch.Tensor, absmax: torch.Tensor, absmax_code: _Opt, absmax2: _Opt, offset: _Opt,
                    blocksize: int, numel: int, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    out = empty((numel,), dtype=dtype, device=data.device)
    _run(data, absmax, absmax_code, absmax2, offset, blocksize, numel, out, backend)
    return out


def _nf4_dequantize_fake(data: torch.Tensor, absmax: torch.Tensor, absmax_code: _Opt, absmax2: _Opt, offset: _Opt,
                         blocksize: int, numel: int, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    return data.new_empty((numel,), dtype=dtype)


def _nf4_dequantize_out(data: torch.Tensor, absmax: torch.Tensor, absmax_code: _Opt, absmax2: _Opt, offset: _Opt,
                        blocksize: int, numel: int, out: torch.Tensor, backend: str = "auto") -> None:
    _run(data, absmax, absmax_code, absmax2, offset, blocksize, numel, out, backend)


def _nf4_dequantize_out_fake(data: torch.Tensor, absmax: torch.Tensor, absmax_code: _Opt, absmax2: _Opt,
                             offset: _Opt, blocksize: int, numel: int, out: torch.Tensor,
                             backend: str = "auto") -> None:
    return None


define(f"nf4_dequantize({_ARGS}, ScalarType dtype, str backend='auto') -> Tensor", _nf4_dequantize,
       _nf4_dequantize_fake)
define(f"nf4_dequantize_out({_ARGS}, Tensor(a!) out, str backend='auto') -> ()", _nf4_dequantize_out,
       _nf4_dequantize_out_fake)


def dequantize_nf4(w: NF4Weight, *, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   backend: Backend | str = "auto") -> torch.Tensor:
    """Dequantize an NF4 weight: bit-exact with ``bitsandbytes.functional.dequantize_4bit`` (the values the bytes
    encode; bitsandbytes 0.49-0.50's CPU dequantize on AVX-512 CPUs misreads weights whose rows are not whole
    blocks, which this reads correctly).

    Args:
        w: the weight (see :func:`fastlora.quantize_nf4` and :meth:`NF4Weight.from_bnb`).
        dtype: float32, float16 or bfloat16; default ``w.dtype``.
        out: a contiguous tensor of ``w.shape`` and ``dtype`` on ``w``'s device to write into (reuse one buffer
            across layers to avoid an allocation per call).
        backend: ``"auto"`` or one of ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``.

    Returns:
        ``w.shape`` in ``dtype`` (``out`` itself when given).

    Example:
        >>> w = fastlora.quantize_nf4(torch.randn(1024, 4096, dtype=torch.bfloat16))
        >>> fastlora.dequantize_nf4(w).shape
        torch.Size([1024, 4096])
    """
    if not isinstance(w, NF4Weight):
        raise TypeError(f"dequantize_nf4: w must be an NF4Weight (NF4Weight.from_bnb reads bitsandbytes weights), "
                        f"got {type(w).__name__}")
    dtype = dtype or (out.dtype if out is not None else w.dtype)
    if dtype not in _DTYPES:
        raise TypeError(f"dequantize_nf4: dtype must be float32, float16 or bfloat16, got {dtype}")
    name = backend.value if isinstance(backend, Backend) else str(backend).lower()
    args = (w.data, w.absmax, w.absmax_code, w.absmax2, w.offset, w.blocksize, w.numel)
    if out is None:
        return call("nf4_dequantize", *args, dtype, name).view(w.shape)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"dequantize_nf4: out must be a tensor, got {type(out).__name__}")
    if out.shape != w.shape or out.dtype != dtype or out.device != w.device or not out.is_contiguous():
        raise ValueError(f"dequantize_nf4: out must be a contiguous {dtype} tensor of shape {tuple(w.shape)} on "
                         f"{w.device}, got a {out.dtype} tensor of shape {tuple(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    call("nf4_dequantize_out", *args, out.view(-1), name)
    return out
