"""Moving NF4 weights between fastlora and bitsandbytes without copying (the only module that imports it)."""

from __future__ import annotations

import warnings

import torch

from .._logging import logger
from .nf4_weight import ABSMAX_BLOCKSIZE, NF4_CODE, NF4Weight


def from_bnb(param_or_layer: object) -> NF4Weight:
    """See :meth:`NF4Weight.from_bnb`."""
    param = param_or_layer
    if not isinstance(param, torch.Tensor) and hasattr(param, "weight"):
        param = param.weight
    state = getattr(param, "quant_state", None)
    if state is None and param is not param_or_layer:
        # A wrapper that rebuilds the parameter (FSDP2 all-gathers it into a plain tensor) drops the state the
        # Params4bit carried; Linear4bit keeps its own reference, from which bitsandbytes' forward restores it.
        state = getattr(param_or_layer, "quant_state", None)
        if state is not None and (param.dim() != 2 or param.shape[1] != 1):
            raise ValueError(f"NF4Weight.from_bnb: the layer's weight of shape {tuple(param.shape)} has lost its "
                             "quantization state and is not packed 4-bit data ([n, 1])")
    if not isinstance(param, torch.Tensor) or state is None:
        raise TypeError(
            "NF4Weight.from_bnb: expected a quantized bitsandbytes Params4bit or a layer holding one (such as "
            f"Linear4bit, moved to its device so that it is quantized), got {type(param_or_layer).__name__}")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(
            "NF4Weight.from_bnb: this weight was repacked by bitsandbytes for CPU inference (an eval-mode forward "
            "on a CPU with AVX512-BF16), a layout fastlora does not read; use the layer in train mode, or reload it")
    if state.quant_type != "nf4":
        raise ValueError(f"NF4Weight.from_bnb: quant_type is {state.quant_type!r}; fastlora reads NF4 weights only "
                         "(quantize with quant_type='nf4')")
    # quant_storage other than uint8 (bf16 for FSDP) holds the same bytes: view them, never convert.
    data = param.data.view(torch.uint8).reshape(-1)
    if data.data_ptr() != param.data.data_ptr():
        raise ValueError("NF4Weight.from_bnb: the packed data is not contiguous, so it cannot be read without a copy")
    if not state.nested:
        return NF4Weight(data, state.absmax, state.shape, state.dtype, state.blocksize)
    state2 = state.state2
    if state2.blocksize != ABSMAX_BLOCKSIZE:
        raise ValueError(f"NF4Weight.from_bnb: second-level blocksize {state2.blocksize}, expected {ABSMAX_BLOCKSIZE}")
    if state2.dtype not in (None, torch.float32):
        return NF4Weight(data, _bnb_nested_absmax(state), state.shape, state.dtype, state.blocksize)
    offset = state.offset if isinstance(state.offset, torch.Tensor) else torch.tensor(state.offset)
    return NF4Weight(data, state.absmax, state.shape, state.dtype, state.blocksize, state2.code, state2.absmax,
                     offset.to(device=data.device, dtype=torch.float32))


def _bnb_nested_absmax(state: object) -> torch.Tensor:
    """The fp32 absmax of a double-quantized weight whose second level bitsandbytes decodes in bf16 or fp16.

    bitsandbytes decodes the second level in ``state2.dtype``: bf16 after its CPU repack is undone (state_dict of a
    layer that ran an eval forward on an AVX512-BF16 CPU) or in a checkpoint saved from one (``nested_dtype``).
    Each decoded absmax then carries that dtype's rounding, which fastlora's fp32 decode would not reproduce (it
    would differ in every absmax and in a few percent of the bf16 weights). Decoding it here once, with
    bitsandbytes' own calls in its order, gives the same fp32 absmax its dequantize uses.
    """
    from bitsandbytes.functional import dequantize_blockwise

    logger.debug("NF4Weight.from_bnb: the nested absmax is stored for decoding in %s; decoding it once as "
                 "bitsandbytes does (the NF4Weight holds fp32 absmax, not nested)", state.state2.dtype)
    absmax = dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float().contiguous()


def to_bnb(w: NF4Weight) -> torch.Tensor:
    """See :meth:`NF4Weight.to_bnb`."""
    from bitsandbytes.nn import Params4bit

    _warn_if_bnb_cpu_misreads(w)
    return Params4bit(w.data.view(-1, 1), requires_grad=False, quant_state=_quant_state(w), blocksize=w.blocksize,
                      compress_statistics=w.nested, quant_type="nf4", quant_storage=torch.uint8, bnb_quantized=True)


def _quant_state(w: NF4Weight) -> object:
    from bitsandbytes.functional import QuantState

    state2 = None
    if w.nested:
        state2 = QuantState(absmax=w.absmax2, code=w.absmax_code, blocksize=ABSMAX_BLOCKSIZE, dtype=torch.float32)
    return QuantState(
        absmax=w.absmax, shape=w.shape, code=torch.tensor(NF4_CODE, device=w.device), blocksize=w.blocksize,
        quant_type="nf4", dtype=w.dtype, offset=w.offset, state2=state2,
    )


def _warn_if_bnb_cpu_misreads(w: NF4Weight) -> None:
    """Warn (once per shape) when bitsandbytes' CPU dequantize would misread ``w``.

    bitsandbytes 0.49-0.50 on AVX-512 CPUs dequantizes even widths with a vectorised kernel that takes each row's
    absmax from ``row * (K // blocksize)``: wrong when rows are not whole blocks (blocks cross rows). Only weights
    whose rows are not whole blocks, with more than one row, are probed, on a few rows of the same width (cached),
    so real models' weights cost nothing and a fixed bitsandbytes or an unaffected CPU gives no warning.
    """
    if w.device.type != "cpu" or len(w.shape) < 2:
        return
    cols = w.shape[-1]
    rows = w.numel // cols if cols else 0
    if rows < 2 or cols % w.blocksize == 0:
        return
    if not _bnb_cpu_misreads(min(rows, w.blocksize // cols + 2), cols, w.blocksize):
        return
    import bitsandbytes

    warnings.warn(
        f"NF4Weight.to_bnb: bitsandbytes' CPU dequantize misreads a 4-bit weight of shape {tuple(w.shape)} at "
        f"blocksize {w.blocksize} (rows that are not whole blocks) on this machine (bitsandbytes "
        f"{bitsandbytes.__version__}; a defect of 0.49-0.50 on AVX-512 CPUs): its dequantize_4bit and Linear4bit "
        "forward compute with wrong values for it. fastlora's own ops read it correctly.", UserWarning, stacklevel=4)


_PROBES: dict[tuple[int, int, int], bool] = {}


def _bnb_cpu_misreads(rows: int, cols: int, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU dequantize_4bit of a random ``[rows, cols]`` NF4 weight differs from fastlora's."""
    key = (rows, cols, blocksize)
    if key not in _PROBES:
        from bitsandbytes.functional import dequantize_4bit

        from .nf4 import dequantize_nf4
        from .nf4_weight import quantize_nf4

        g = torch.Generator().manual_seed(0)
        probe = quantize_nf4(torch.randn(rows, cols, generator=g), blocksize=blocksize, double_quant=False)
        try:
            theirs = dequantize_4bit(probe.data.view(-1, 1), _quant_state(probe)).reshape(rows, cols)
        except Exception as e:  # a probe must never break to_bnb; bitsandbytes will say it again when used
            logger.debug("bitsandbytes' CPU dequantize_4bit failed on a probe: %s", e)
            theirs = None
        _PROBES[key] = theirs is not None and not torch.equal(theirs, dequantize_nf4(probe, backend="torch"))
        logger.debug("bitsandbytes' CPU dequantize of a [%d, %d] NF4 weight at blocksize %d is %s", rows, cols,
                     blocksize, "wrong" if _PROBES[key] else "right")
    return _PROBES[key]
