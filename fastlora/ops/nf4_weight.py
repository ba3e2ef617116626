"""NF4 4-bit weights in bitsandbytes' format, byte for byte, and the pure-PyTorch quantizer that writes them.

The format (see the project's REFERENCE.md): element ``i`` of the flattened weight is the nibble of byte
``i >> 1`` (high nibble for even ``i``), indexing :data:`NF4_CODE`; it is scaled by the absmax of its block
``i // blocksize``, blocks running over the flat index. With double quantization the absmax values are themselves
8-bit codes into a 256-entry dynamic map, in blocks of 256, plus a mean ``offset``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..kernels._utils import NF4_CODE

#: The blocksizes bitsandbytes allows for 4-bit weights.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Blocksize of the second level of double quantization (fixed by bitsandbytes).
ABSMAX_BLOCKSIZE = 256
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class NF4Weight:
    """A weight quantized to NF4, in bitsandbytes' layout (zero-copy to and from ``Params4bit``).

    Attributes:
        data: uint8 ``[ceil(numel / 2)]``, two codes per byte, the even element in the high nibble.
        absmax: ``[num_blocks]``: fp32 scales, or uint8 codes into ``absmax_code`` when double quantized.
        shape: the logical shape of the weight, e.g. ``(out_features, in_features)``.
        dtype: the dtype the weight dequantizes to by default.
        blocksize: elements per absmax block (one of :data:`BLOCKSIZES`).
        absmax_code: fp32 ``[256]`` dynamic map of the second level (double quantization only).
        absmax2: fp32 ``[ceil(num_blocks / 256)]`` second-level scales (double quantization only).
        offset: fp32 0-dim tensor added to every decoded absmax (double quantization only).

    Example:
        >>> w = fastlora.quantize_nf4(torch.randn(4096, 4096, dtype=torch.bfloat16))
        >>> w.shape, w.data.shape, w.nested
        (torch.Size([4096, 4096]), torch.Size([8388608]), True)
        >>> fastlora.dequantize_nf4(w).shape
        torch.Size([4096, 4096])
    """

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax_code: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        _validate(self)

    @property
    def nested(self) -> bool:
        """Whether the absmax values are double quantized."""
        return self.absmax_code is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: torch.device | str) -> NF4Weight:
        """The same weight with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    @classmethod
    def from_bnb(cls, param_or_layer: object) -> NF4Weight:
        """View a bitsandbytes ``Params4bit`` (or a layer holding one, such as ``Linear4bit``) without copying.

        The result dequantizes to exactly the values the bytes encode, as bitsandbytes' ``dequantize_4bit`` decodes
        them (except where its CPU kernel misreads a weight whose rows are not whole blocks: see :meth:`to_bnb`).
        A nested absmax that bitsandbytes decodes in bf16 or fp16 (``quant_state.state2.dtype``: a checkpoint's
        ``nested_dtype``, or a weight whose CPU repack was undone) is decoded once here, as bitsandbytes does, into
        fp32 absmax: the packed data is still shared, the returned weight is not nested.

        Raises:
            TypeError: not a 4-bit bitsandbytes weight.
            ValueError: an FP4 weight, or one repacked by bitsandbytes for CPU inference.

        Example:
            >>> layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cuda")
            >>> w = NF4Weight.from_bnb(layer)
            >>> torch.equal(fastlora.dequantize_nf4(w), bnb.functional.dequantize_4bit(layer.weight.data,
            ...                                                                          layer.weight.quant_state))
            True
        """
        from .nf4_bnb import from_bnb

        return from_bnb(param_or_layer)

    def to_bnb(self) -> object:
        """A bitsandbytes ``Params4bit`` sharing this weight's tensors (needs bitsandbytes).

        Warns (``UserWarning``, once per shape) when the weight is on the CPU, its rows are not whole blocks, and
        bitsandbytes' CPU dequantize is found to misread such a weight here (bitsandbytes 0.49-0.50 on AVX-512 CPUs):
        bitsandbytes' own forward would then compute with wrong values; fastlora's ops read it correctly.

        Example:
            >>> layer = bnb.nn.Linear4bit(4096, 4096, quant_type="nf4")
            >>> layer.weight = fastlora.quantize_nf4(w).to_bnb()
        """
        from .nf4_bnb import to_bnb

        return to_bnb(self)


def _validate(w: NF4Weight) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"NF4Weight: {msg}")

    if not isinstance(w.data, torch.Tensor) or w.data.dtype != torch.uint8:
        raise TypeError(f"NF4Weight: data must be a uint8 tensor, got {getattr(w.data, 'dtype', type(w.data))}")
    if w.blocksize not in BLOCKSIZES:
        fail(f"blocksize {w.blocksize} is not one bitsandbytes allows ({', '.join(map(str, BLOCKSIZES))})")
    if w.dtype not in _FLOATS:
        raise TypeError(f"NF4Weight: dtype must be float32, float16 or bfloat16, got {w.dtype}")
    if w.data.dim() != 1 or not w.data.is_contiguous():
        fail(f"data must be a contiguous 1-D tensor, got shape {tuple(w.data.shape)}")
    if w.data.numel() != (w.numel + 1) // 2:
        fail(f"data has {w.data.numel()} bytes, a weight of shape {tuple(w.shape)} needs {(w.numel + 1) // 2}")
    if w.absmax.dim() != 1 or w.absmax.numel() != w.num_blocks:
        fail(f"absmax has shape {tuple(w.absmax.shape)}, expected [{w.num_blocks}] (one per block of {w.blocksize})")
    nested = (w.absmax_code, w.absmax2, w.offset)
    if any(t is None for t in nested) and any(t is not None for t in nested):
        fail("absmax_code, absmax2 and offset must be given together (double quantization) or not at all")
    if w.absmax_code is None:
        if w.absmax.dtype != torch.float32:
            raise TypeError(f"NF4Weight: absmax must be float32 without double quantization, got {w.absmax.dtype}")
        return
    if w.absmax.dtype != torch.uint8:
        raise TypeError(f"NF4Weight: absmax must be uint8 codes with double quantization, got {w.absmax.dtype}")
    if w.absmax_code.shape != (256,) or w.absmax_code.dtype != torch.float32:
        fail(f"absmax_code must be float32 [256], got {w.absmax_code.dtype} {tuple(w.absmax_code.shape)}")
    want2 = -(-w.num_blocks // ABSMAX_BLOCKSIZE)
    if w.absmax2.shape != (want2,) or w.absmax2.dtype != torch.float32:
        fail(f"absmax2 must be float32 [{want2}], got {w.absmax2.dtype} {tuple(w.absmax2.shape)}")
    if w.offset.numel() != 1 or w.offset.dtype != torch.float32:
        fail(f"offset must be a float32 scalar, got {w.offset.dtype} {tuple(w.offset.shape)}")
    for name in ("absmax", "absmax_code", "absmax2", "offset"):
        if getattr(w, name).device != w.data.device:
            fail(f"{name} is on {getattr(w, name).device}, data on {w.data.device}")


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic map that double quantization codes absmax values with: fp32 ``[256]``, sorted.

    Dettmers' dynamic type: for each of 7 decimal exponents, the midpoints of an even split of [0.1, 1] scaled by
    that power of ten, with both signs, then 0 and 1, padded with zeros to 256 entries.

    Example:
        >>> dynamic_map()[[0, 127, 255]]
        tensor([-0.9930,  0.0000,  1.0000])
    """
    values: list[float] = []
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (exponent - 6)
        # fp32 products, as the table bitsandbytes ships was computed: the last bit matters for equal bytes.
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    # Ties go to the lower code: bucketize's left-closed search over the midpoints.
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, midpoints, out_int32=True)


def _nf4_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], with bitsandbytes' 4-bit arithmetic (fp32 ``flat``)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Full blocks multiply by the reciprocal, the ragged tail divides: bitsandbytes' exact arithmetic, so that
    # the bytes match its quantizer.
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_max = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_max, -1, 1)])
    return absmax, scaled


def _quantize_absmax(absmax: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The second level: 8-bit codes of fp32 ``absmax`` in blocks of 256, and each block's scale."""
    n = absmax.numel()
    padded = torch.nn.functional.pad(absmax, (0, -n % ABSMAX_BLOCKSIZE)).view(-1, ABSMAX_BLOCKSIZE)
    absmax2 = padded.abs().amax(dim=1)
    scaled = (padded / absmax2.unsqueeze(1)).reshape(-1)[:n]
    codes = _nearest_code(scaled, code)
    # A block of zeros divides 0 by 0; bitsandbytes stores code 0 there (it decodes to the offset either way).
    return torch.where(torch.isnan(scaled), 0, codes).to(torch.uint8), absmax2


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a weight to NF4, writing the same bytes as ``bitsandbytes.functional.quantize_4bit``.

    Args:
        weight: any shape, float32, float16 or bfloat16, on any device.
        blocksize: elements per absmax block, one of :data:`BLOCKSIZES` (bitsandbytes' default is 64).
        double_quant: also quantize the absmax values to 8 bits (bitsandbytes' ``compress_statistics``).

    Returns:
        An :class:`NF4Weight` on ``weight``'s device that dequantizes to ``weight.dtype``.

    Example:
        >>> w = quantize_nf4(torch.randn(1024, 4096, dtype=torch.bfloat16), blocksize=64)
        >>> w.data.shape, w.absmax.dtype
        (torch.Size([2097152]), torch.uint8)
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"quantize_nf4: weight must be a tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOATS:
        raise TypeError(f"quantize_nf4: weight has dtype {weight.dtype}, expected float32, float16 or bfloat16")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize {blocksize} is not one bitsandbytes allows "
                         f"({', '.join(map(str, BLOCKSIZES))})")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4: weight is empty")
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _nf4_scale(flat, blocksize)
    # An odd count pads the last byte's low nibble with the code of 0.0, as bitsandbytes does.
    scaled = torch.nn.functional.pad(scaled, (0, scaled.numel() % 2))
    codes = _nearest_code(scaled, torch.tensor(NF4_CODE, device=flat.device)).to(torch.uint8)
    data = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Weight(data, absmax, weight.shape, weight.dtype, blocksize)
    offset = absmax.mean()
    code = dynamic_map(flat.device)
    absmax_codes, absmax2 = _quantize_absmax(absmax - offset, code)
    return NF4Weight(data, absmax_codes, weight.shape, weight.dtype, blocksize, code, absmax2, offset)
