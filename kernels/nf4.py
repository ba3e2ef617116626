"""NF4 dequantization: one launch decodes both absmax levels and the nibbles, bit-exact with bitsandbytes."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._utils import NF4_CODE, elementwise_warps

# Output elements per program: 2048 packed bytes, 16 to a thread in one 128-bit load; 32 outputs to a thread in
# 128-bit stores (fastlora.benchmarks.static reads the widths; 4 bytes a thread gave 32-bit loads).
_BLOCK = 4096
_ROW_BYTES = 16


@triton.jit
def nf4_dequantize_fwd_kernel(p_data, p_absmax, p_code2, p_absmax2, p_offset, p_pairs, p_out, numel, n_bytes,
                              NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr,
                              ROW_BYTES: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // (2 * ROW_BYTES)
    i_b = tl.program_id(0).to(tl.int64)  # int64: an 8B model's largest layer alone has 2**29 bytes
    # 16 packed bytes (32 elements) a row: every blocksize bitsandbytes allows (>= 32) keeps a row inside one
    # absmax block, so the scale is decoded once a row rather than once a byte.
    o_row = i_b * ROWS + tl.arange(0, ROWS)  # [ROWS]
    o_byte = o_row[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :]  # [ROWS, ROW_BYTES]
    # n_bytes comes from the host rather than (numel + 1) // 2: as an argument it is specialised as divisible by
    # 16 when it is, so that the mask does not stop a row's bytes being loaded in one 128-bit load.
    m_byte = o_byte < n_bytes
    m_row = o_row * ROW_BYTES < n_bytes  # [ROWS]
    b_byte = tl.load(p_data + o_byte, mask=m_byte, other=0).to(tl.int32)  # [ROWS, ROW_BYTES]
    o_blk = o_row // (BLOCKSIZE // (2 * ROW_BYTES))  # [ROWS]
    if NESTED:
        b_q = tl.load(p_absmax + o_blk, mask=m_row, other=0).to(tl.int32)
        b_code = tl.load(p_code2 + b_q, mask=m_row, other=0.0)
        b_scale2 = tl.load(p_absmax2 + o_blk // 256, mask=m_row, other=0.0)
        # Multiply, round, add, round: the launcher turns fp fusion off so this stays bitsandbytes' arithmetic.
        b_scale = b_code * b_scale2 + tl.load(p_offset)  # [ROWS]
    else:
        b_scale = tl.load(p_absmax + o_blk, mask=m_row, other=0.0)  # [ROWS]
    b_pair = tl.load(p_pairs + b_byte)  # [ROWS, ROW_BYTES] int64: both codes of each byte in one lookup
    b_hi = (b_pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * b_scale[:, None]  # even elements
    b_lo = (b_pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * b_scale[:, None]  # odd elements
    b_out = tl.reshape(tl.join(b_hi, b_lo), (BLOCK,))  # [BLOCK] interleaved back into element order
    o_out = i_b * BLOCK + tl.arange(0, BLOCK)
    tl.store(p_out + o_out, b_out.to(p_out.dtype.element_ty), mask=o_out < numel)


@functools.cache
def _nf4_table(device: torch.device) -> torch.Tensor:
    """The 16 NF4 codes, fp32 (made once per device)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def _nf4_pairs(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The codes of each byte's two nibbles in ``dtype``, packed in one integer twice its width (256 entries: int64
    for fp32, int32 for fp16/bf16), so that one lookup decodes two elements: entry b holds the bits of the high
    nibble's code (the even element) in its low half."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype)
    wide, bits = (torch.int64, 32) if dtype == torch.float32 else (torch.int32, 16)
    raw = code.view(torch.int32 if bits == 32 else torch.int16).to(torch.int64) & ((1 << bits) - 1)
    b = torch.arange(256)
    # Two's-complement wrap into the signed type: the kernels split the halves with shifts and truncations.
    pairs = raw[b >> 4] | (raw[b & 0xF] << bits)
    return (pairs - ((pairs >> (2 * bits - 1)) << (2 * bits)) if bits == 16 else pairs).to(device, wide)


def nf4_dequantize(data: torch.Tensor, absmax: torch.Tensor, absmax_code: torch.Tensor | None,
                   absmax2: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, numel: int,
                   out: torch.Tensor) -> None:
    """Write the ``numel`` dequantized elements into the flat contiguous ``out`` (its dtype sets the output's)."""
    if numel == 0:
        return
    nested = absmax_code is not None
    # Unused pointers of the plain layout point at absmax; NESTED prunes their loads at compile time.
    code2, scale2, off = (absmax_code, absmax2, offset) if nested else (absmax, absmax, absmax)
    nf4_dequantize_fwd_kernel[(triton.cdiv(numel, _BLOCK),)](
        data, absmax, code2, scale2, off, _nf4_pairs(data.device), out, numel, (numel + 1) // 2,
        NESTED=nested, BLOCKSIZE=blocksize, BLOCK=_BLOCK, ROW_BYTES=_ROW_BYTES, enable_fp_fusion=False,
        num_warps=elementwise_warps(data.device),
    )
