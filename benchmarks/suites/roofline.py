"""The device's roofline, measured: copy bandwidth and dense matmul rate. The first suite of every run.

A shape here is ``(copy bytes, matmul n)``: the ``copy`` provider copies a tensor of that many bytes (and
counts them read and written), the ``matmul`` provider multiplies two ``n x n`` matrices (``2 n^3`` flops) in
the suite's dtype: bf16 8192^3 on a GPU, as the targets define the roofline; fp32 on the CPU, at a size two
cores finish in a fraction of a second.
"""

from __future__ import annotations

import torch

from ..harness import Case, Provider, Result, Roofline, Shape, Shapes, Suite, Work, randn, run_suite

_MIB = 1 << 20


def _make(provider: str, mode: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    copy_bytes, n = shape
    if provider == "copy":
        src = torch.ones(copy_bytes // dtype.itemsize, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        return Case(fn=lambda: dst.copy_(src), work=Work(bytes=2 * src.nbytes))
    if provider == "matmul":
        a = randn((n, n), device=device, dtype=dtype, seed=0)
        b = randn((n, n), device=device, dtype=dtype, seed=1)
        return Case(fn=lambda: torch.mm(a, b), work=Work(bytes=3 * a.nbytes, flops=2 * n**3))
    raise ValueError(f"roofline: unknown provider {provider!r} (expected copy or matmul)")


def _label(shape: Shape) -> str:
    copy_bytes, n = shape
    return f"copy {copy_bytes // _MIB} MiB; matmul {n}^3"


SUITE = Suite(
    name="roofline",
    description="copy bandwidth (read + written bytes) and dense matmul rate, measured",
    providers=(Provider("copy", "reference"), Provider("matmul", "reference")),
    modes=("forward",),
    shapes=Shapes(gpu=((1024 * _MIB, 8192),), cpu=((256 * _MIB, 2048),), cpu_quick=((64 * _MIB, 1024),)),
    make=_make,
    reference=None,
    label=_label,
)

# Per device: the roofline and whether it came from a quick run. A full measurement replaces a quick one.
_measured: dict[str, tuple[Roofline, bool]] = {}


def from_results(results: list[Result]) -> Roofline | None:
    """The roofline in a run of this suite: the best copy and matmul rates (None if either failed).

    Example:
        >>> from_results(run_suite(SUITE, torch.device("cpu"), quick=True))
        Roofline(copy_gbps=22.3, matmul_tflops=0.18)
    """
    rates: dict[str, float] = {}
    for r in results:
        if r.suite == SUITE.name and r.timing is not None:
            seconds = r.timing.median_ms / 1e3
            rate = r.work.bytes / seconds / 1e9 if r.provider == "copy" else r.work.flops / seconds / 1e12
            rates[r.provider] = max(rates.get(r.provider, 0.0), rate)
    if "copy" not in rates or "matmul" not in rates:
        return None
    return Roofline(copy_gbps=rates["copy"], matmul_tflops=rates["matmul"])


def remember(device: torch.device, roofline: Roofline, *, quick: bool) -> None:
    """Keep a measured roofline for this process (a quick one never replaces a full one).

    Example:
        >>> remember(torch.device("cpu"), Roofline(22.3, 0.18), quick=True)
    """
    known = _measured.get(str(device))
    if known is None or (known[1] and not quick):
        _measured[str(device)] = (roofline, quick)


def measure(device: torch.device, *, quick: bool = False) -> Roofline | None:
    """The device's roofline, measured on first use and cached in-process (None if it could not be measured).

    A quick request is served by any earlier measurement; a full one measures again after a quick one.

    Example:
        >>> measure(torch.device("cpu"), quick=True).copy_gbps > 0
        True
    """
    known = _measured.get(str(device))
    if known is not None and (quick or not known[1]):
        return known[0]
    roofline = from_results(run_suite(SUITE, device, quick=quick))
    if roofline is not None:
        remember(device, roofline, quick=quick)
    return roofline
