"""The shapes the static estimates are made at: a Llama-3.1-8B's (hidden 4096, MLP 14336, 32 q / 8 kv heads of 128,
vocabulary 128256), bf16, with the work each launch does.

``traffic`` is the bytes a kernel moves as written (the cross-entropy reads its logits twice), ``min_bytes`` the
least any kernel doing the job must move (the roofline's), ``trips`` each loop's trip count per program,
``weights`` the NF4 weights a launch streams (for instructions per weight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

H, INTER, V, HQ, HK, D = 4096, 14336, 128256, 32, 8, 128
BF16 = torch.bfloat16
#: Where the cases' tensors live: the CPU for the static analysis (nothing runs), a GPU when timed.
DEVICE = torch.device("cpu")


def _t(*shape: int, dtype: torch.dtype = torch.float32, high: int = 256) -> torch.Tensor:
    """A tensor of the case: empty on the CPU (untouched pages cost no memory, and nothing is launched), random on
    a GPU (integers below ``high``), so that timed kernels read real values."""
    t = torch.empty(shape, dtype=dtype, device=DEVICE)
    if DEVICE.type != "cpu":
        t.normal_() if dtype.is_floating_point else t.random_(0, high)
    return t


@dataclass
class Case:
    name: str
    kind: str  # "gemm", "dequant", "elementwise", "reduction"
    launcher: Callable[[tuple[int, int]], None]  # called with the device's (SMs, capability major): grids adapt
    traffic: float
    min_bytes: float
    flops: float = 0.0
    trips: float = 1.0
    weights: int = 0
    mnk: tuple[int, int, int] | None = None  # a GEMM's rows, W's rows and columns


def _nf4_tensors(n: int, k: int) -> tuple[torch.Tensor, ...]:
    numel = n * k
    absmax2 = _t(numel // 64 // 256 + 1).abs_()
    return (_t(numel // 2, dtype=torch.uint8), _t(numel // 64, dtype=torch.uint8), _t(256), absmax2, _t())


def _nf4_bytes(n: int, k: int) -> float:
    return n * k / 2 + n * k / 64


def dequant(n: int = H, k: int = INTER) -> Case:
    from fastlora.kernels import nf4

    data, absmax, code2, absmax2, offset = _nf4_tensors(n, k)
    out = _t(n * k, dtype=BF16)
    moved = _nf4_bytes(n, k) + 2 * n * k
    return Case(f"nf4_dequantize {n}x{k}", "dequant",
                lambda gpu: nf4.nf4_dequantize(data, absmax, code2, absmax2, offset, 64, n * k, out), moved, moved,
                weights=n * k)


def nf4_matmul(m: int, n: int, k: int, trans: bool = False) -> Case:
    """``out = x W^T`` ([m, n]) for W [n, k], or with ``trans`` the backward's ``dX = dY W`` ([m, k])."""
    from fastlora.kernels import nf4_matmul as kernel

    data, absmax, code2, absmax2, offset = _nf4_tensors(n, k)
    q, p = (n, k) if trans else (k, n)
    x, out = _t(m, q, dtype=BF16), _t(m, p, dtype=BF16)
    moved = _nf4_bytes(n, k) + 2 * m * (q + p)
    what = f"dX {m}x{p} (W {n}x{k})" if trans else f"{m}x{p} (W {n}x{k})"
    return Case(f"nf4_matmul {what}", "gemm",
                lambda gpu: kernel.nf4_matmul(x, data, absmax, code2, absmax2, offset, 64, n, k, out, trans_w=trans,
                                              gpu=gpu),
                moved, moved, flops=2 * m * n * k, trips=q / 64, weights=n * k, mnk=(m, n, k))


def rope(backward: bool = False, b: int = 4, s: int = 4096) -> Case:
    from fastlora.kernels import rope as kernel

    q = _t(b, s, HQ, D, dtype=BF16).transpose(1, 2)
    k = _t(b, s, HK, D, dtype=BF16).transpose(1, 2)
    cos = sin = _t(1, s, D, dtype=BF16)
    moved = 2 * 2 * b * s * (HQ + HK) * D + 2 * 2 * s * D
    # Each program rotates its token's q heads then its k heads, 16 heads a trip: 2 trips, then 1.
    return Case(f"rope{' backward' if backward else ''} B{b} S{s}", "elementwise",
                lambda gpu: kernel.rope(q, k, cos, sin, q, k, head_dim=1, backward=backward), moved, moved, trips=1.5)


def cross_entropy(n: int = 8192, v: int = V) -> Case:
    from fastlora.kernels import cross_entropy as kernel

    logits, labels = _t(n, v, dtype=BF16), _t(n, dtype=torch.int64, high=v)
    loss, lse, scale = _t(n), _t(n), torch.ones((), device=DEVICE)
    block = min(1 << (v - 1).bit_length(), 4096)
    # Two passes over each row (the logsumexp, then the gradient written over the logits): two reads, one write.
    return Case(f"cross_entropy N{n} V{v}", "reduction",
                lambda gpu: kernel.cross_entropy_fwd(logits, labels, scale, logits, loss, lse,
                                                     ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None),
                3 * 2 * n * v, 2 * 2 * n * v, trips=-(-v // block))


def swiglu(backward: bool = False, n: int = 8192 * INTER) -> Case:
    from fastlora.kernels import swiglu as kernel

    g = _t(n, dtype=BF16)
    moved = (5 if backward else 3) * 2 * n  # read gate, up (and grad); write out (or dgate, dup)
    launch = (lambda gpu: kernel.swiglu_bwd(g, g, g)) if backward else (lambda gpu: kernel.swiglu_fwd(g, g))
    return Case(f"swiglu{' backward' if backward else ''} 8192x{INTER}", "elementwise", launch, moved, moved)


def glu(backward: bool = False, rows: int = 8192) -> Case:
    from fastlora.kernels import glu as kernel

    gu, h = _t(rows, 2 * INTER, dtype=BF16), _t(rows, INTER, dtype=BF16)
    moved = (5 if backward else 3) * 2 * rows * INTER
    launch = (lambda gpu: kernel.glu_bwd_(h, gu, "silu")) if backward else \
        (lambda gpu: kernel.glu_fwd(gu, h, "silu"))
    return Case(f"glu silu{' backward' if backward else ''} 8192x{INTER}", "elementwise", launch, moved, moved)


def all_cases() -> list[Case]:
    gemms = []
    for m in (1, 16, 64, 256):
        gemms += [nf4_matmul(m, INTER, H), nf4_matmul(m, H, INTER), nf4_matmul(m, INTER, H, trans=True)]
    return [dequant(), *gemms, rope(), rope(backward=True), cross_entropy(), swiglu(), swiglu(backward=True),
            glu(), glu(backward=True)]
