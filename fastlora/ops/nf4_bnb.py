"""Moving NF4 weights between fastlora and bitsandbytes without copying (the only module that imports it)."""

from __future__ import annotations

import torch

from .nf4_weight import ABSMAX_BLOCKSIZE, NF4_CODE, NF4Weight


def from_bnb(param_or_layer: object) -> NF4Weight:
    """See :meth:`NF4Weight.from_bnb`."""
    param = param_or_layer
    if not isinstance(param, torch.Tensor) and hasattr(param, "weight"):
        param = param.weight
    state = getattr(param, "quant_state", None)
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
    offset = state.offset if isinstance(state.offset, torch.Tensor) else torch.tensor(state.offset)
    return NF4Weight(data, state.absmax, state.shape, state.dtype, state.blocksize, state2.code, state2.absmax,
                     offset.to(device=data.device, dtype=torch.float32))


def to_bnb(w: NF4Weight) -> torch.Tensor:
    """See :meth:`NF4Weight.to_bnb`."""
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Params4bit

    state2 = None
    if w.nested:
        state2 = QuantState(absmax=w.absmax2, code=w.absmax_code, blocksize=ABSMAX_BLOCKSIZE, dtype=torch.float32)
    state = QuantState(
        absmax=w.absmax, shape=w.shape, code=torch.tensor(NF4_CODE, device=w.device), blocksize=w.blocksize,
        quant_type="nf4", dtype=w.dtype, offset=w.offset, state2=state2,
    )
    return Params4bit(w.data.view(-1, 1), requires_grad=False, quant_state=state, blocksize=w.blocksize,
                      compress_statistics=w.nested, quant_type="nf4", quant_storage=torch.uint8, bnb_quantized=True)
