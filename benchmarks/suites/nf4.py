"""NF4 dequantization with double quantization (blocksize 64): eager and compiled torch, bitsandbytes, fastlora.

Shapes are a weight's logical ``[out, in]``: Llama-3.1-8B's projections on a GPU (q/o 4096x4096, k/v 1024x4096,
gate/up 14336x4096, down 4096x14336). Each weight is quantized once per (shape, device, dtype) from seeded normal
values and shared by every provider, so all dequantize the same bytes.

Providers: ``torch`` (the pure-PyTorch reference, eager: the gate's oracle), ``compile`` (torch.compile of the
reference), ``bitsandbytes`` (``dequantize_4bit`` of the same weight viewed as a ``Params4bit``), ``fastlora``
(backend chosen by the dispatcher), one per explicit backend (``fastlora-cpp`` on the CPU, ``fastlora-cuda`` and
``fastlora-triton`` on a GPU), and ``fastlora-out``: the dispatcher's choice writing into a preallocated buffer,
as QLoRA layers reuse one across projections (it allocates nothing, so its peak memory is about zero). On the CPU,
``fastlora-cpp-<path>`` and ``fastlora-cpp-<path>-out`` force each SIMD path of the C++ kernel (``avx512``,
``avx2``, ``portable``; a path this CPU lacks is skipped with the reason); ``benchmarks/nf4_isa.py`` times the
same interleaved. Forward only: dequantization has no gradient.

Work (see :func:`work`): the packed codes, both levels of scales and the output; no flops, so the metric is GB/s
and the share is of the copy bandwidth.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

import fastlora
from fastlora import NF4Weight, quantize_nf4
from fastlora.ops.nf4 import nf4_dequantize_reference
from fastlora.ops.nf4_weight import ABSMAX_BLOCKSIZE

from ..harness import Case, Provider, Shape, Shapes, Suite, Unavailable, Work, randn

BLOCKSIZE = 64
_EXPLICIT = {"fastlora-cpp": "cpp", "fastlora-cuda": "cuda", "fastlora-triton": "triton"}
_CPU_PATHS = ("avx512", "avx2", "portable")


def work(shape: Shape, dtype: torch.dtype, blocksize: int = BLOCKSIZE) -> Work:
    """What dequantizing a double-quantized NF4 weight of ``shape`` to ``dtype`` must move.

    Read: the packed codes (half a byte per element), one uint8 absmax code per block and one fp32 second-level
    scale per 256 blocks (the 1 KB code table and the offset stay in cache). Written: the output.

    Example:
        >>> work((1024, 4096), torch.bfloat16)   # 2 MiB codes + 64 KiB absmax + 1 KiB absmax2 + 8 MiB out
        Work(bytes=10552320, flops=0)
    """
    numel = math.prod(shape)
    blocks = -(-numel // blocksize)
    absmax2 = -(-blocks // ABSMAX_BLOCKSIZE)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Work(bytes=-(-numel // 2) + blocks + 4 * absmax2 + numel * itemsize)


@functools.lru_cache(maxsize=8)
def _weight(shape: Shape, device: str, dtype: torch.dtype) -> NF4Weight:
    # Quantized on the device it runs on (a 14336x4096 weight takes seconds on a CPU) and once per shape: every
    # provider of the shape reuses it. Eight NF4 weights of the GPU shapes hold well under 200 MB.
    return quantize_nf4(randn(shape, device=torch.device(device), dtype=dtype, seed=0), blocksize=BLOCKSIZE,
                        double_quant=True)


def _reference_args(w: NF4Weight) -> tuple[object, ...]:
    return (w.data, w.absmax, w.absmax_code, w.absmax2, w.offset, w.blocksize, w.numel, w.dtype)


@functools.cache
def _compiled() -> Callable[..., torch.Tensor]:
    # One compiled function for the process. Not dynamic: each shape gets kernels specialized to its sizes,
    # the best torch.compile can do for a fixed weight (a QLoRA model has a handful of weight shapes).
    return torch.compile(nf4_dequantize_reference, dynamic=False)


def _bitsandbytes(w: NF4Weight) -> Callable[[], torch.Tensor]:
    try:
        from bitsandbytes.functional import dequantize_4bit
    except Exception as e:  # not installed, or its native library does not load here
        raise Unavailable(f"bitsandbytes cannot be imported: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}") from None
    p = w.to_bnb()
    return lambda: dequantize_4bit(p.data, p.quant_state)


def _explicit(provider: str, device: torch.device, dtype: torch.dtype) -> str:
    backend = _EXPLICIT[provider]
    if backend == "triton" and device.type == "cpu":
        raise Unavailable("Triton runs on the CPU only in its interpreter, which is for tests, not timing")
    if backend == "cpp" and device.type != "cpu":
        raise Unavailable("the C++ kernel runs on the CPU")
    if backend == "cuda" and device.type != "cuda":
        raise Unavailable("the CUDA kernel runs on a GPU")
    try:
        fastlora.resolve_backend("nf4_dequantize", device, dtype, backend)
    except fastlora.BackendUnavailableError as e:
        raise Unavailable(str(e)) from None
    return backend


def _cpu_path(provider: str, w: NF4Weight, device: torch.device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    from ..nf4_isa import forced, path_support

    path = provider.removeprefix("fastlora-cpp-").removesuffix("-out")
    backend = _explicit("fastlora-cpp", device, dtype)
    why = path_support()[path]
    if why:
        raise Unavailable(why)
    if not provider.endswith("-out"):
        def fresh() -> torch.Tensor:
            with forced(path):
                return fastlora.dequantize_nf4(w, backend=backend)

        return fresh
    out = torch.full(w.shape, float("nan"), dtype=dtype, device=device)

    def reused() -> torch.Tensor:
        with forced(path):
            return fastlora.dequantize_nf4(w, backend=backend, out=out)

    return reused


def _implementation(provider: str, w: NF4Weight, device: torch.device,
                    dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    if provider == "torch":
        args = _reference_args(w)
        return lambda: nf4_dequantize_reference(*args).view(w.shape)
    if provider == "compile":
        compiled, args = _compiled(), _reference_args(w)
        return lambda: compiled(*args).view(w.shape)
    if provider == "bitsandbytes":
        return _bitsandbytes(w)
    if provider == "fastlora":
        return lambda: fastlora.dequantize_nf4(w)
    if provider == "fastlora-out":
        # NaN until written: the gate's run would see any element the kernel skips.
        out = torch.full(w.shape, float("nan"), dtype=dtype, device=device)
        return lambda: fastlora.dequantize_nf4(w, out=out)
    if provider.startswith("fastlora-cpp-"):
        return _cpu_path(provider, w, device, dtype)
    if provider in _EXPLICIT:
        backend = _explicit(provider, device, dtype)
        return lambda: fastlora.dequantize_nf4(w, backend=backend)
    raise ValueError(f"nf4: unknown provider {provider!r}")


def _make(provider: str, mode: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    if mode != "forward":
        raise ValueError(f"nf4: dequantization has no {mode} mode (forward only)")
    w = _weight(tuple(shape), str(device), dtype)
    return Case(fn=_implementation(provider, w, device, dtype), work=work(shape, dtype, w.blocksize))


SUITE = Suite(
    name="nf4",
    description="NF4 dequantize (double quant)",
    providers=(
        Provider("torch", "reference"),
        Provider("compile", "baseline", compiled=True),
        Provider("bitsandbytes", "baseline"),
        Provider("fastlora", "fastlora"),
        Provider("fastlora-out", "fastlora"),
        Provider("fastlora-cpp", "fastlora"),
        *(Provider(f"fastlora-cpp-{path}{out}", "fastlora") for path in _CPU_PATHS for out in ("", "-out")),
        Provider("fastlora-cuda", "fastlora"),
        Provider("fastlora-triton", "fastlora"),
    ),
    modes=("forward",),
    # Llama-3.1-8B's projection weights [out, in]: q/o, k/v, gate/up, down.
    shapes=Shapes(gpu=((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)),
                  cpu=((4096, 4096), (1024, 4096)), cpu_quick=((256, 1024),)),
    make=_make,
)
