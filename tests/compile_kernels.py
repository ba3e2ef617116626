"""Compile every Triton kernel, as its launcher calls it, for NVIDIA GPUs, on a machine without one.

The interpreter runs a kernel's arithmetic but never compiles it: a construct the GPU compiler rejects, or a
load that does not vectorise, shows only on a GPU. Triton compiles ahead of time for a named target without a
device (down to PTX and cubin with its bundled ptxas), so this script calls each launcher with CPU tensors,
catches the launch (nothing runs), and compiles it with the argument specialisation Triton's JIT would give it
(16-byte aligned pointers, integers divisible by 16). It prints a JSON list: per kernel variant and target,
whether it compiled, the error otherwise, and the counts of the PTX's global load and store instructions.

Run it with the interpreter off (``TRITON_INTERPRET`` unset): ``python tests/compile_kernels.py``.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable

import torch

from fastlora.benchmarks.static.compile import capture, compile_launch, root_cause

TARGETS = ("sm90", "sm80", "sm75")
# Global loads, direct or asynchronous into shared memory (pipelined loops on sm_80+), and stores, in the PTX
# text: static instruction counts per variant, not dynamic ones.
_LOADS = r"(?:ld\.global|cp\.async\.\w+\.shared\.global)[\w.]*"
_STORES = r"st\.global[\w.]*"


def _cases() -> list[tuple[str, bool, Callable[[], None]]]:
    """(name, runs on Turing too (no bf16), the launcher call)."""
    from fastlora.kernels import cross_entropy, glu, nf4, nf4_matmul, rope, swiglu

    def nf4_case(nested: bool, dtype: torch.dtype) -> Callable[[], None]:
        n, k, bs = 1024, 4096, 64
        numel = n * k
        data = torch.zeros((numel + 1) // 2, dtype=torch.uint8)
        if nested:
            absmax = torch.zeros(numel // bs, dtype=torch.uint8)
            code2, absmax2, offset = torch.zeros(256), torch.zeros(numel // bs // 256 + 1), torch.zeros(())
        else:
            absmax, code2, absmax2, offset = torch.zeros(numel // bs), None, None, None
        return lambda: nf4.nf4_dequantize(data, absmax, code2, absmax2, offset, bs, numel,
                                          torch.empty(numel, dtype=dtype))

    def nf4_matmul_case(dtype: torch.dtype, trans: bool) -> Callable[[], None]:
        n, k, m, r = 1024, 4096, 64, 16
        data = torch.zeros(n * k // 2, dtype=torch.uint8)
        absmax, code2 = torch.zeros(n * k // 64, dtype=torch.uint8), torch.zeros(256)
        absmax2, offset = torch.zeros(n * k // 64 // 256 + 1), torch.zeros(())
        x = torch.zeros(m, n if trans else k, dtype=dtype)
        out = torch.empty(m, k if trans else n, dtype=dtype)
        e1, e2 = torch.zeros(m, r, dtype=dtype), torch.zeros(out.shape[1], r, dtype=dtype)
        return lambda: nf4_matmul.nf4_matmul(x, data, absmax, code2, absmax2, offset, 64, n, k, out, trans_w=trans,
                                             e1=e1, e2=e2, bias=None if trans else torch.zeros(n, dtype=dtype))

    def rope_case(dtype: torch.dtype, rot: int, backward: bool, out: torch.dtype | None = None,
                  cos_dtype: torch.dtype | None = None) -> Callable[[], None]:
        q = torch.zeros(2, 16, 32, 128, dtype=dtype).transpose(1, 2)  # HF's [B, H, S, D] view of [B, S, H, D]
        k = torch.zeros(2, 16, 8, 128, dtype=dtype).transpose(1, 2)
        cos = sin = torch.zeros(1, 16, rot, dtype=cos_dtype or dtype)
        return lambda: rope.rope(q, k, cos, sin, torch.empty_like(q, dtype=out), torch.empty_like(k, dtype=out),
                                 head_dim=1, backward=backward)

    def ce_case(dtype: torch.dtype, softcap: float | None, grad: bool) -> Callable[[], None]:
        logits, labels = torch.zeros(4, 128256, dtype=dtype), torch.zeros(4, dtype=torch.int64)
        return lambda: cross_entropy.cross_entropy_fwd(
            logits, labels, torch.ones(()), logits if grad else None, torch.empty(4), torch.empty(4),
            ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=softcap)

    def glu_case(dtype: torch.dtype, activation: str, backward: bool) -> Callable[[], None]:
        gu, h = torch.zeros(16, 2 * 1408, dtype=dtype), torch.zeros(16, 1408, dtype=dtype)
        return (lambda: glu.glu_bwd_(h, gu, activation)) if backward else (lambda: glu.glu_fwd(gu, h, activation))

    def swiglu_case(dtype: torch.dtype, backward: bool) -> Callable[[], None]:
        g = torch.zeros(16, 1408, dtype=dtype)
        return (lambda: swiglu.swiglu_bwd(g, g, g)) if backward else (lambda: swiglu.swiglu_fwd(g, g))

    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        turing = dtype is not torch.bfloat16
        name = str(dtype).removeprefix("torch.")
        cases += [
            (f"nf4_dequantize nested {name}", turing, nf4_case(True, dtype)),
            (f"nf4_dequantize plain {name}", turing, nf4_case(False, dtype)),
            (f"rope {name}", turing, rope_case(dtype, 128, False)),
            (f"rope partial backward {name}", turing, rope_case(dtype, 96, True)),
            (f"cross_entropy {name}", turing, ce_case(dtype, None, True)),
            (f"cross_entropy softcap no-grad {name}", turing, ce_case(dtype, 30.0, False)),
            (f"cross_entropy softcap {name}", turing, ce_case(dtype, 30.0, True)),
            (f"swiglu {name}", turing, swiglu_case(dtype, False)),
            (f"swiglu backward {name}", turing, swiglu_case(dtype, True)),
        ]
        cases += [(f"glu {act}{' backward' if bwd else ''} {name}", turing, glu_case(dtype, act, bwd))
                  for act in ("silu", "gelu_tanh", "gelu") for bwd in (False, True)]
        if dtype is not torch.float32:  # the NF4 GEMM runs in the 16-bit compute dtypes on a GPU
            # Autocast's bf16 q and k with fp32 cos and sin: fp32 out, then the gradients back to the 16-bit dtype.
            f32 = torch.float32
            cases += [(f"rope partial promoted {name}", turing, rope_case(dtype, 96, False, f32, f32)),
                      (f"rope partial promoted backward {name}", turing, rope_case(f32, 96, True, dtype))]
            cases += [(f"nf4_matmul {name}", turing, nf4_matmul_case(dtype, False)),
                      (f"nf4_matmul transposed {name}", turing, nf4_matmul_case(dtype, True))]
    return cases


def main() -> int:
    report = []
    for name, turing, launch in _cases():
        for call in capture(launch):
            for target in TARGETS:
                if target == "sm75" and not turing:
                    continue
                row = {"case": name, "kernel": call.name, "target": target}
                try:
                    ptx = compile_launch(call, target).asm["ptx"]
                except Exception as e:  # the report says which variant failed and why
                    row.update(ok=False, error=root_cause(e))
                else:
                    loads, stores = Counter(re.findall(_LOADS, ptx)), Counter(re.findall(_STORES, ptx))
                    row.update(ok=True, loads=loads, stores=stores)
                report.append(row)
    json.dump(report, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
