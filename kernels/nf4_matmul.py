"""A GEMM that reads an NF4 weight directly, with the LoRA branch in its epilogue: for small M (decoding,
evaluation) where dequantize-then-GEMM would spend its time writing and reading a dense copy of the weight.

    forward  (TRANS_W=False): out[M, N] = X[M, K] @ W[N, K]^T + E1[M, R] @ E2[N, R]^T (+ bias[N])
    backward (TRANS_W=True):  out[M, K] = dY[M, N] @ W[N, K]   + E1[M, R] @ E2[K, R]^T

W is bitsandbytes' NF4 layout (element ``n * K + k``, high nibble first, absmax per block of the flat index, nested
or plain), decoded tile by tile in registers and rounded to the output dtype as dequantize_4bit does, so the
result equals dequantize-then-GEMM up to the order of the fp32 sums. The exception is the forward at up to 16 rows
(decoding, where weight streaming is the whole cost): there the dot takes each code rounded to the output dtype and
the absmax scales its fp32 result once per 64-wide block, which is one rounding per weight away from
dequantize_4bit's values (within the tests' tolerance, measured at about a third of it). The backward is the same
kernel reading W transposed (a constexpr flag), with the LoRA term ``G A`` (``G = dY (s B)``) as its epilogue.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .nf4 import _nf4_pairs, _nf4_table


@triton.jit
def _dot(b_a, b_b, IEEE: tl.constexpr):
    # fp32 operands: full fp32 products as torch's fp32 matmul gives them by default, not TF32's 10-bit mantissa.
    if IEEE:
        return tl.dot(b_a, b_b, input_precision="ieee")
    return tl.dot(b_a, b_b)


@triton.jit
def _absmax(p_absmax, p_code2, p_absmax2, p_offset, o_blk, m, NESTED: tl.constexpr):
    """The fp32 scales of blocks ``o_blk`` (any shape), both levels decoded when NESTED."""
    # One return: the compiler types every return statement, those of a pruned constexpr branch too.
    if NESTED:
        b_q8 = tl.load(p_absmax + o_blk, mask=m, other=0).to(tl.int32)
        b_code = tl.load(p_code2 + b_q8, mask=m, other=0.0)
        b_scale = b_code * tl.load(p_absmax2 + o_blk // 256, mask=m, other=0.0) + tl.load(p_offset)
    else:
        b_scale = tl.load(p_absmax + o_blk, mask=m, other=0.0)
    return b_scale


@triton.jit
def _w_rows(p_data, p_absmax, p_code2, p_absmax2, p_offset, p_pairs, o_r, m_r, c0, K,
            NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``W[o_r, c0 : c0 + COLS]`` decoded, ``[ROWS, COLS]`` fp32, for tiles inside one absmax block per row (the
    launcher's ROW_BLOCKS): each row's packed bytes are one contiguous run, loaded as such, and its scale is
    decoded once. Each byte's two codes come from one 64-bit lookup in the 256-entry pair table: the lookups are
    most of the K loop's instructions (403 a tile and warp with a lookup per element, 266 with one per byte, sm_90a,
    fastlora.benchmarks.static)."""
    o_byte = o_r[:, None].to(tl.int64) * (K // 2) + (c0 // 2 + tl.arange(0, COLS // 2))[None, :]  # [ROWS, COLS/2]
    b_byte = tl.load(p_data + o_byte, mask=m_r[:, None], other=0).to(tl.int32)
    o_blk = (o_r.to(tl.int64) * K + c0) // BLOCKSIZE  # [ROWS]
    b_scale = _absmax(p_absmax, p_code2, p_absmax2, p_offset, o_blk, m_r, NESTED)  # [ROWS]
    b_pair = tl.load(p_pairs + b_byte)  # [ROWS, COLS/2] int64
    b_hi = (b_pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * b_scale[:, None]  # even columns
    b_lo = (b_pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * b_scale[:, None]  # odd columns
    return tl.reshape(tl.join(b_hi, b_lo), (ROWS, COLS))


@triton.jit
def _pair_codes(b_pair, DT: tl.constexpr):
    """The two codes of pair-table entries (``_nf4_pairs(device, DT)``), ``[..., 2]`` in DT."""
    BITS: tl.constexpr = DT.primitive_bitwidth
    UT: tl.constexpr = tl.int16 if BITS == 16 else tl.int32
    return tl.join(b_pair.to(UT).to(DT, bitcast=True), (b_pair >> BITS).to(UT).to(DT, bitcast=True))


@triton.jit
def _w_codes(p_words, p_codes, o_r, m_r, c0, K, DT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The NF4 codes of ``W[o_r, c0 : c0 + COLS]`` in DT, unscaled, ``[ROWS, COLS]``: the packed bytes read four to
    a 32-bit word, each byte's two codes one lookup in the pair table of DT, already the dot's operand type (no
    multiply, no rounding per element). 32-bit words rather than bytes: an 8-bit load in the chain makes Triton pick
    a dot-operand layout whose fragments ptxas reassembles with a move per register."""
    # int32 offsets: words and blocks are an eighth and a 64th of the weight's elements (2**31 words is 2**34 weights).
    o_word = o_r[:, None] * (K // 8) + (c0 // 8 + tl.arange(0, COLS // 8))[None, :]  # [ROWS, COLS/8]
    b_word = tl.load(p_words + o_word, mask=m_r[:, None], other=0)
    # Little-endian: byte j of a word holds elements 2j (high nibble) and 2j + 1.
    b_p0 = _pair_codes(tl.load(p_codes + (b_word & 0xFF)), DT)  # [ROWS, COLS/8, 2]
    b_p1 = _pair_codes(tl.load(p_codes + ((b_word >> 8) & 0xFF)), DT)
    b_p2 = _pair_codes(tl.load(p_codes + ((b_word >> 16) & 0xFF)), DT)
    b_p3 = _pair_codes(tl.load(p_codes + ((b_word >> 24) & 0xFF)), DT)
    b_w = tl.join(tl.join(b_p0, b_p2), tl.join(b_p1, b_p3))  # [ROWS, COLS/8, 2, 2, 2]: (nibble, byte) last
    return tl.reshape(tl.permute(b_w, (0, 1, 3, 4, 2)), (ROWS, COLS))


@triton.jit
def nf4_matmul_fwd_kernel(p_x, p_data, p_absmax, p_code2, p_absmax2, p_offset, p_nf4, p_pairs, p_codes, p_words,
                          p_e1, p_e2, p_bias, p_out, p_part, M, P, Q, K, R, Q_SPLIT, stride_xm, stride_e1m,
                          stride_e2p, stride_e2r, stride_om,
                          NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, TRANS_W: tl.constexpr,
                          HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                          ROW_BLOCKS: tl.constexpr, SCALE_ACC: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr,
                          BP: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr):
    # out is [M, P], the reduction runs over Q: (P, Q) = (N, K) forward, (K, N) backward. With SPLIT, program
    # (i_m, i_p, i_s) sums Q's slice [i_s * Q_SPLIT, (i_s + 1) * Q_SPLIT) into its fp32 partial p_part[i_s] (the
    # launcher adds the partials up), and the epilogue is the first slice's.
    DT: tl.constexpr = p_out.dtype.element_ty
    # The dot's inputs: the output dtype on a GPU; fp32 holding the same values in the interpreter, whose
    # bf16 tensors are raw integers.
    DOT: tl.constexpr = tl.float32 if DOT_FP32 else DT
    i_m, i_p, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    o_p = i_p * BP + tl.arange(0, BP)  # [BP]
    m_m, m_p = o_m < M, o_p < P
    b_acc = tl.zeros((BM, BP), dtype=tl.float32)  # [BM, BP]
    if SPLIT:
        q_start, q_end, first = i_s * Q_SPLIT, tl.minimum(i_s * Q_SPLIT + Q_SPLIT, Q), i_s == 0
    else:  # the whole reduction, bounds the compiler knows (the split variant takes more registers)
        q_start, q_end, first = 0, Q, True
    for q0 in range(q_start, q_end, BQ):
        o_q = q0 + tl.arange(0, BQ)  # [BQ]
        m_q = o_q < Q
        b_x = tl.load(p_x + o_m[:, None].to(tl.int64) * stride_xm + o_q[None, :],
                      mask=m_m[:, None] & m_q[None, :], other=0.0).to(tl.float32)  # [BM, BQ]
        if ROW_BLOCKS:
            # Rounded to the output dtype as dequantize_4bit's result is, then multiplied in that dtype.
            if TRANS_W:  # W[q rows, p columns] is already the [BQ, BP] operand
                b_w = _w_rows(p_data, p_absmax, p_code2, p_absmax2, p_offset, p_pairs, o_q, m_q, i_p * BP, K,
                              NESTED, BLOCKSIZE, BQ, BP).to(DT).to(DOT)  # [BQ, BP]
                b_acc += _dot(b_x.to(DT).to(DOT), b_w, DOT == tl.float32)
            elif SCALE_ACC:
                # The tile lies in one absmax block per output column: the dot takes the codes as they are and its
                # fp32 result is scaled per column, once a trip rather than once a weight.
                b_w = _w_codes(p_words, p_codes, o_p, m_p, q0, K, DT, BP, BQ).to(DOT)  # [BP, BQ]
                b_scale = _absmax(p_absmax, p_code2, p_absmax2, p_offset, o_p * (K // BLOCKSIZE) + q0 // BLOCKSIZE,
                                  m_p, NESTED)  # [BP]
                b_acc = tl.fma(_dot(b_x.to(DT).to(DOT), tl.trans(b_w), DOT == tl.float32), b_scale[None, :], b_acc)
            else:
                b_w = _w_rows(p_data, p_absmax, p_code2, p_absmax2, p_offset, p_pairs, o_p, m_p, q0, K,
                              NESTED, BLOCKSIZE, BP, BQ).to(DT).to(DOT)  # [BP, BQ]
                b_acc += _dot(b_x.to(DT).to(DOT), tl.trans(b_w), DOT == tl.float32)
        else:
            # Any layout: each element's byte, nibble and block from its flat index n * K + k (int64: 14336 x
            # 4096 passes 2**31 / 2).
            if TRANS_W:
                o_w = o_q[None, :].to(tl.int64) * K + o_p[:, None]  # [BP, BQ]: q is n, p is k
            else:
                o_w = o_p[:, None].to(tl.int64) * K + o_q[None, :]  # [BP, BQ]: p is n, q is k
            m_w = m_p[:, None] & m_q[None, :]
            b_byte = tl.load(p_data + (o_w >> 1), mask=m_w, other=0).to(tl.int32)  # [BP, BQ]
            b_nib = tl.where((o_w & 1) == 0, b_byte >> 4, b_byte & 0xF)
            b_scale = _absmax(p_absmax, p_code2, p_absmax2, p_offset, o_w // BLOCKSIZE, m_w, NESTED)  # [BP, BQ]
            b_w = (tl.load(p_nf4 + b_nib, mask=m_w, other=0.0) * b_scale).to(DT).to(DOT)  # [BP, BQ]
            b_acc += _dot(b_x.to(DT).to(DOT), tl.trans(b_w), DOT == tl.float32)
    if HAS_LORA and first:
        for r0 in range(0, R, BR):
            o_r = r0 + tl.arange(0, BR)  # [BR]
            m_r = o_r < R
            b_e1 = tl.load(p_e1 + o_m[:, None].to(tl.int64) * stride_e1m + o_r[None, :],
                           mask=m_m[:, None] & m_r[None, :], other=0.0).to(tl.float32)  # [BM, BR]
            b_e2 = tl.load(p_e2 + o_p[:, None].to(tl.int64) * stride_e2p + o_r[None, :] * stride_e2r,
                           mask=m_p[:, None] & m_r[None, :], other=0.0).to(tl.float32)  # [BP, BR]
            b_acc += _dot(b_e1.to(DT).to(DOT), tl.trans(b_e2.to(DT).to(DOT)), DOT == tl.float32)
    if HAS_BIAS and first:
        b_acc += tl.load(p_bias + o_p, mask=m_p, other=0.0).to(tl.float32)[None, :]
    if SPLIT:
        o_part = i_s.to(tl.int64) * M * P + o_m[:, None].to(tl.int64) * P + o_p[None, :]  # [BM, BP]
        tl.store(p_part + o_part, b_acc, mask=m_m[:, None] & m_p[None, :])
    else:
        tl.store(p_out + o_m[:, None].to(tl.int64) * stride_om + o_p[None, :], b_acc.to(DT),
                 mask=m_m[:, None] & m_p[None, :])


# CTAs an SM holds at once of the split variant, by compute capability major and (row tile, transposed W), as
# fastlora.benchmarks.static reads them (sm_90a: 128 and 80 registers at 16 rows, 108 and 94 at 64, 155 and 152 at
# 128; sm_80 about as many, less shared memory). Other GPUs take sm_80's, the fewer.
_CTAS_PER_SM = {9: {(16, False): 4, (16, True): 6, (64, False): 4, (64, True): 5, (128, False): 3, (128, True): 3},
                8: {(16, False): 4, (16, True): 5, (64, False): 3, (64, True): 3, (128, False): 2, (128, True): 2}}
# The least reduction a slice keeps: 4 trips of the K loop, so that the 3-stage pipeline still fills.
_MIN_SLICE = 4 * 64


@functools.cache
def _gpu(device: torch.device) -> tuple[int, int]:
    """(SM count, compute capability major) of a GPU, read once: launchers run on every projection of every step.
    AMD GPUs take sm_80's CTA counts (major 0)."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, 0 if torch.version.hip else props.major


def split_q(ctas: int, q: int, resident: int) -> int:
    """The slice of the reduction each program sums (``q`` itself: no split): as many slices as keep the grid
    within one wave of the CTAs the GPU holds at once (a 4096-wide output is 64 tiles of 64 at 16 rows: half of an
    H100's SMs, and a twelfth of what they hold; a grid just past a whole wave would leave a second one nearly
    idle), none shorter than ``_MIN_SLICE``. ``resident``: the CTAs the GPU holds at once (0: unknown, no split)."""
    if 2 * ctas > resident or q < 2 * _MIN_SLICE:
        return q
    slices = min(resident // ctas, q // _MIN_SLICE)
    return q if slices <= 1 else triton.cdiv(triton.cdiv(q, slices), 64) * 64


def nf4_matmul(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, absmax_code: torch.Tensor | None,
               absmax2: torch.Tensor | None, offset: torch.Tensor | None, blocksize: int, n: int, k: int,
               out: torch.Tensor, *, trans_w: bool = False, e1: torch.Tensor | None = None,
               e2: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               gpu: tuple[int, int] | None = None, q_split: int | None = None) -> None:
    """``out = x @ W^T (+ e1 @ e2^T) (+ bias)``, or with ``trans_w`` ``out = x @ W (+ e1 @ e2^T)``, W ``[n, k]`` NF4.

    ``x`` ``[M, Q]`` and ``e1`` ``[M, R]`` have contiguous rows; ``e2`` is ``[P, R]`` with any strides (``A.t()``
    in the backward); ``out`` ``[M, P]`` with contiguous rows, in the compute dtype. A grid too small for the GPU
    (``gpu``: its SM count and compute capability major, read from a CUDA device when None) splits the reduction
    into slices summed in fp32 in a fixed order; ``q_split`` forces the slice (tests).
    """
    m, q = x.shape
    p = out.shape[1]
    if m == 0 or p == 0:
        return
    nested = absmax_code is not None
    code2, scale2, off = (absmax_code, absmax2, offset) if nested else (absmax, absmax, absmax)
    has_lora = e1 is not None
    rank = e1.shape[1] if has_lora else 0
    # Small M is the point: one row block of 16 (tl.dot's least) covers decoding, 64 for prompts, 128 past that
    # (each row block decodes the whole weight again).
    bm = 16 if m <= 16 else 64 if m <= 64 else 128
    # Each row's 64-element tiles lie inside one absmax block: the byte-run paths (the usual shapes; K odd, or
    # blocks that straddle rows or tiles, take the element-wise one).
    row_blocks = k % blocksize == 0 and blocksize % 64 == 0
    # The forward at 16 rows scales the dot's result per column (its K tile is one absmax block) and reads the bytes
    # as 32-bit words: 128 output columns a tile, ~0.15 warp-instructions a weight on sm_90a against 0.23 with a
    # multiply and a rounding per weight (fastlora.benchmarks.static). From 64 rows the per-column scales would sit
    # in the wgmma accumulator's layout, several columns a thread, each decoded again (0.5 a weight).
    scale_acc = row_blocks and not trans_w and bm == 16 and data.is_contiguous() and data.storage_offset() % 4 == 0
    bp = 128 if scale_acc else 64
    tiles = triton.cdiv(m, bm) * triton.cdiv(p, bp)
    if gpu is None and x.is_cuda:
        gpu = _gpu(x.device)
    resident = gpu[0] * _CTAS_PER_SM.get(gpu[1], _CTAS_PER_SM[8])[bm, trans_w] if gpu else 0
    q_split = q_split or split_q(tiles, q, resident)
    slices = triton.cdiv(q, q_split)
    part = torch.empty((slices, m, p), dtype=torch.float32, device=x.device) if slices > 1 else out
    grid = (triton.cdiv(m, bm), triton.cdiv(p, bp), slices)
    nf4_matmul_fwd_kernel[grid](
        x, data, absmax, code2, scale2, off, _nf4_table(x.device), _nf4_pairs(x.device),
        _nf4_pairs(x.device, out.dtype), data.reshape(-1).view(torch.int32) if scale_acc else data,
        e1 if has_lora else x, e2 if has_lora else x, bias if bias is not None else x, out, part, m, p, q, k, rank,
        q_split, x.stride(0), e1.stride(0) if has_lora else 0, e2.stride(0) if has_lora else 0,
        e2.stride(1) if has_lora else 0, out.stride(0), NESTED=nested, BLOCKSIZE=blocksize, TRANS_W=trans_w,
        HAS_LORA=has_lora, HAS_BIAS=bias is not None, DOT_FP32=x.device.type == "cpu", ROW_BLOCKS=row_blocks,
        SCALE_ACC=scale_acc, SPLIT=slices > 1,
        # 2 stages: the pipeliner copies each table lookup to shared memory, and a third stage costs more of
        # those than the latency it hides (sm_90a K loop: 230 instructions a tile and warp against 266; the split
        # grid keeps 3-6 CTAs on an SM to hide the rest).
        BM=bm, BP=bp, BQ=64, BR=16, enable_fp_fusion=False, num_stages=2,
    )
    if slices > 1:
        # The slices' fp32 sums added in slice order (deterministic, unlike atomics), rounded once.
        out.copy_(part.sum(dim=0))
