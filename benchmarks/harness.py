"""The harness every suite runs under: suites and cases, the correctness gate, and the runner.

A :class:`Suite` crosses providers (implementations), modes (``forward``, ``backward``, ``full``) and shapes.
For each combination its factory builds a :class:`Case`: the call to time, the tensors it produces and its
:class:`Work` (bytes moved, flops). Before a provider is timed its outputs (and gradients) are compared with the
reference provider's; one that disagrees is reported as failing the gate and never timed or saved.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

import fastlora

from .cases import MODES, Case, Shape, Work, autograd_case, randn
from .gate import DEFAULT_TOLERANCE, compare
from .timing import Timing, peak_memory, time_fn

# The building blocks of cases and the gate are re-exported: a suite imports everything from here.
__all__ = [
    "MODES", "Case", "Progress", "Provider", "Result", "Roofline", "Shape", "Shapes", "Suite", "Unavailable",
    "Work", "autograd_case", "compare", "default_dtype", "default_label", "measure", "prepare", "randn",
    "run_suite", "tolerance",
]

logger = logging.getLogger("fastlora.benchmarks")


class Unavailable(Exception):
    """Raised by a suite's factory when a provider cannot run here; the message says why."""


@dataclass(frozen=True)
class Provider:
    """An implementation under test. ``kind`` is "reference", "baseline" (eager or compiled torch, peers),
    "fastlora", or "floor": a lower bound that does only part of the work (the bare matmuls of a fused op), timed
    for comparison but not gated, since its outputs are not the op's. Only a fastlora provider failing the gate
    makes a run fail.

    Example:
        >>> Provider("fastlora-cpp").kind
        'fastlora'
    """

    name: str
    kind: str = "fastlora"
    # torch.compile'd: it compiles on its first call, which takes tens of seconds on a CPU (so quick CPU runs skip
    # it), and a compiler that cannot run here makes it unavailable rather than an error.
    compiled: bool = False


@dataclass(frozen=True)
class Shapes:
    """A suite's shapes: the real ones for a GPU, smaller ones for the CPU, and tiny ones for quick runs.

    A quick run on a GPU takes ``gpu_quick`` (default: the first GPU shape).

    Example:
        >>> Shapes(gpu=((8192, 14336),), cpu=((2048, 4096),), cpu_quick=((256, 1024),)).pick(
        ...     torch.device("cpu"), quick=True)
        ((256, 1024),)
    """

    gpu: tuple[Shape, ...]
    cpu: tuple[Shape, ...]
    cpu_quick: tuple[Shape, ...]
    gpu_quick: tuple[Shape, ...] | None = None

    def pick(self, device: torch.device, quick: bool) -> tuple[Shape, ...]:
        """The shapes to run on ``device``."""
        if device.type == "cpu":
            return self.cpu_quick if quick else self.cpu
        return (self.gpu_quick or self.gpu[:1]) if quick else self.gpu


def default_dtype(device: torch.device) -> torch.dtype:
    """The device's recommended compute dtype (the design's precision policy, from the device probe).

    Example:
        >>> default_dtype(torch.device("cpu"))   # every CPU, bf16 instructions or not
        torch.float32
    """
    return fastlora.device_info(device).compute_dtype


def default_label(shape: Shape) -> str:
    """``(2048, 4096)`` -> ``"2048x4096"``."""
    return "x".join(str(n) for n in shape)


Factory = Callable[[str, str, Shape, torch.device, torch.dtype], Case]


@dataclass(frozen=True)
class Suite:
    """A benchmark: providers x modes x shapes, and the factory that builds each case.

    Example:
        >>> def make(provider, mode, shape, device, dtype):
        ...     x = randn(shape, device=device, dtype=dtype)
        ...     return Case(fn=lambda: x * 2, work=Work(bytes=2 * x.nbytes))
        >>> suite = Suite(name="double", providers=(Provider("torch", "reference"),), modes=("forward",),
        ...               shapes=Shapes(gpu=((1 << 28,),), cpu=((1 << 24,),), cpu_quick=((1 << 16,),)), make=make)
        >>> [r.status for r in run_suite(suite, torch.device("cpu"), quick=True)]
        ['ok']
    """

    name: str
    providers: tuple[Provider, ...]
    modes: tuple[str, ...]
    shapes: Shapes
    make: Factory
    reference: str | None = "torch"
    description: str = ""
    dtype: Callable[[torch.device], torch.dtype] = default_dtype
    label: Callable[[Shape], str] = default_label
    tolerance: dict[torch.dtype, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    # Why a provider is not run here, decided before its case is built (for costs a factory cannot see,
    # such as compile time in a quick run); None runs it.
    skip: Callable[[str, torch.device, bool], str | None] | None = None

    def cases(self, device: torch.device, quick: bool) -> list[tuple[Shape, str, Provider]]:
        """Every (shape, mode, provider) in run order: the reference provider first within a shape and mode."""
        ordered = sorted(self.providers, key=lambda p: p.name != self.reference)
        return [(s, m, p) for s in self.shapes.pick(device, quick) for m in self.modes for p in ordered]


@dataclass(frozen=True)
class Roofline:
    """The device's measured limits: copy bandwidth (read + written bytes per second) and dense matmul rate.

    Example:
        >>> Roofline(copy_gbps=20.0, matmul_tflops=0.2).bound(Work(bytes=2 * 10**9))
        (0.1, 'GB/s')
    """

    copy_gbps: float
    matmul_tflops: float

    def bound(self, work: Work) -> tuple[float, str]:
        """The fastest time ``work`` can take here, in seconds, and the metric of the limit that sets it."""
        memory_s = work.bytes / (self.copy_gbps * 1e9)
        compute_s = work.flops / (self.matmul_tflops * 1e12)
        return (compute_s, "TFLOP/s") if compute_s > memory_s else (memory_s, "GB/s")


@dataclass(frozen=True)
class Result:
    """One provider on one shape and mode. ``status`` is "ok", "skipped" (unavailable here), "failed" (the
    gate found a mismatch) or "error" (it raised); only "ok" rows carry times and are saved.
    """

    suite: str
    provider: str
    kind: str
    mode: str
    shape: str
    dtype: str
    status: str
    reason: str = ""
    timing: Timing | None = None
    peak_mem_bytes: int | None = None
    work: Work = Work()
    max_error: float | None = None
    metric: str = ""
    achieved: float | None = None
    roofline_share: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def fatal(self) -> bool:
        """A fastlora provider gave wrong results or crashed: the run must fail."""
        return self.kind == "fastlora" and self.status in ("failed", "error")

    def with_roofline(self, roofline: Roofline | None) -> Result:
        """Fill in the metric, the achieved rate and the share of ``roofline`` (metric only when None).

        Example:
            >>> r = Result("s", "p", "fastlora", "forward", "1", "float32", "ok",
            ...            timing=Timing(200.0, 190.0, 210.0, 5), work=Work(bytes=2 * 10**9))
            >>> r.with_roofline(Roofline(copy_gbps=20.0, matmul_tflops=0.5)).roofline_share
            0.5
        """
        if self.timing is None:
            return self
        seconds = self.timing.median_ms / 1e3
        if roofline is not None:
            bound_s, metric = roofline.bound(self.work)
            share: float | None = bound_s / seconds
        else:
            metric, share = ("TFLOP/s" if self.work.flops else "GB/s"), None
        achieved = self.work.flops / seconds / 1e12 if metric == "TFLOP/s" else self.work.bytes / seconds / 1e9
        return dataclasses.replace(self, metric=metric, achieved=achieved, roofline_share=share)


class Progress(Protocol):
    """What the runner reports progress to (a tqdm bar fits)."""

    def set_postfix_str(self, s: str) -> None: ...

    def update(self, n: int = 1) -> object: ...


def tolerance(suite: Suite, dtype: torch.dtype) -> tuple[float, ...]:
    """The gate's (rtol, atol) or (rtol, atol, rms_share) for ``dtype``: the suite's own when it sets one.

    Example:
        >>> tolerance(swiglu.SUITE, torch.bfloat16)
        (0.016, 0.01)
    """
    return suite.tolerance.get(dtype) or DEFAULT_TOLERANCE.get(dtype, (1e-3, 1e-3))


class _ReferenceCache:
    """The reference outputs of the last (suite, shape, mode, device, dtype) seen: runs visit the providers of
    one combination in a row, reference first, so one entry suffices and large GPU outputs do not pile up.
    """

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._value: tuple[torch.Tensor, ...] | Exception | None = None

    def put(self, key: tuple[object, ...], value: tuple[torch.Tensor, ...] | Exception) -> None:
        self._key, self._value = key, value

    def get(self, suite: Suite, mode: str, shape: Shape, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = _key(suite, mode, shape, device, dtype)
        if key != self._key:
            self.put(key, _run_reference(suite, suite.make(suite.reference, mode, shape, device, dtype)))
        if isinstance(self._value, Exception):
            raise self._value
        return self._value  # type: ignore[return-value]

    def clear(self) -> None:
        self._key = self._value = None


def _key(suite: Suite, mode: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[object, ...]:
    return (suite.name, mode, shape, str(device), dtype)


def _run_reference(suite: Suite, case: Case) -> tuple[torch.Tensor, ...] | Exception:
    try:
        return tuple(t.detach().clone() for t in case.results())
    except Exception as e:  # kept: it is the reason on every provider this reference should have gated
        logger.exception("%s: the reference %s raised", suite.name, suite.reference)
        return e


_references = _ReferenceCache()


def prepare(suite: Suite, provider: Provider, mode: str, shape: Shape, device: torch.device,
            dtype: torch.dtype, *, quick: bool = False) -> tuple[Case | None, Result]:
    """Build a provider's case and pass it through the gate.

    Returns:
        ``(case, result)``: the case is None unless the provider may be timed; the result carries the status,
        the reason and the gate's max error (status "ok" means gated, not yet timed).

    Example:
        >>> from fastlora.benchmarks.suites import swiglu
        >>> case, result = prepare(swiglu.SUITE, Provider("fastlora"), "forward", (256, 1024),
        ...                        torch.device("cpu"), torch.float32)
        >>> result.status, result.max_error < 1e-5
        ('ok', True)
    """
    base = Result(suite=suite.name, provider=provider.name, kind=provider.kind, mode=mode,
                  shape=suite.label(shape), dtype=str(dtype).removeprefix("torch."), status="ok")
    why = suite.skip(provider.name, device, quick) if suite.skip is not None else None
    if not why and provider.compiled and quick and device.type == "cpu":
        why = "torch.compile takes tens of seconds to compile on the CPU: not run in quick mode"
    if why:
        return None, dataclasses.replace(base, status="skipped", reason=why)
    try:
        case = suite.make(provider.name, mode, shape, device, dtype)
        if provider.compiled:
            case.results()  # compile now, so that a compiler failure is told apart from a wrong result
    except Unavailable as e:
        return None, dataclasses.replace(base, status="skipped", reason=str(e))
    except Exception as e:
        if provider.compiled:
            first = (str(e).splitlines() or [""])[0]
            return None, dataclasses.replace(base, status="skipped",
                                             reason=f"torch.compile failed: {type(e).__name__}: {first}")
        logger.exception("%s/%s: building the %s case failed", suite.name, provider.name, mode)
        return None, dataclasses.replace(base, status="error", reason=f"{type(e).__name__}: {e}")
    base = dataclasses.replace(base, work=case.work)
    if suite.reference is None or provider.kind == "floor":
        return case, base
    if provider.name == suite.reference:
        # Its outputs are what the other providers of this shape and mode are gated against.
        outputs = _run_reference(suite, case)
        _references.put(_key(suite, mode, shape, device, dtype), outputs)
        if isinstance(outputs, Exception):
            return None, dataclasses.replace(base, status="error", reason=f"{type(outputs).__name__}: {outputs}")
        return case, base
    try:
        reference = _references.get(suite, mode, shape, device, dtype)
    except Exception as e:
        # The reference's own row shows the error; this provider is not at fault, only ungated.
        return None, dataclasses.replace(base, status="skipped", reason=f"cannot be gated: the reference "
                                                                         f"{suite.reference} failed ({e})")
    try:
        outputs = case.results()
    except Exception as e:
        logger.exception("%s/%s: running the %s case failed", suite.name, provider.name, mode)
        return None, dataclasses.replace(base, status="error", reason=f"{type(e).__name__}: {e}")
    agrees, max_error, why = compare(outputs, reference, *tolerance(suite, dtype))
    del outputs
    if not agrees:
        return None, dataclasses.replace(base, status="failed", max_error=max_error,
                                         reason=f"disagrees with {suite.reference}: {why}")
    return case, dataclasses.replace(base, max_error=max_error)


def measure(case: Case, result: Result, device: torch.device, *, quick: bool,
            roofline: Roofline | None = None) -> Result:
    """Time a gated case and take its peak memory; fill in the rate and the share of ``roofline``.

    Example:
        >>> from fastlora.benchmarks.suites import swiglu
        >>> case, result = prepare(swiglu.SUITE, Provider("fastlora"), "forward", (256, 1024),
        ...                        torch.device("cpu"), torch.float32)
        >>> measure(case, result, torch.device("cpu"), quick=True).timing.median_ms > 0
        True
    """
    try:
        timing = time_fn(case.fn, device, quick=quick)
        peak = peak_memory(case.fn, device)
    except Exception as e:
        logger.exception("%s/%s: timing the %s case failed", result.suite, result.provider, result.mode)
        return dataclasses.replace(result, status="error", reason=f"{type(e).__name__}: {e}")
    return dataclasses.replace(result, timing=timing, peak_mem_bytes=peak).with_roofline(roofline)


def run_suite(suite: Suite, device: torch.device, *, quick: bool = False, roofline: Roofline | None = None,
              progress: Progress | None = None, dtype: torch.dtype | None = None) -> list[Result]:
    """Run every case of ``suite`` on ``device`` in ``dtype`` (default: the suite's, usually the device's compute
    dtype): gate, then time; one :class:`Result` per case.

    A provider that is unavailable, disagrees with the reference or raises gets a result with that status
    and the reason; the run goes on.

    Example:
        >>> from fastlora.benchmarks.suites import swiglu
        >>> results = run_suite(swiglu.SUITE, torch.device("cpu"), quick=True)
        >>> sorted({r.status for r in results})
        ['ok', 'skipped']
    """
    dtype = dtype or suite.dtype(device)
    results: list[Result] = []
    try:
        for shape, mode, provider in suite.cases(device, quick):
            if progress is not None:
                progress.set_postfix_str(f"{suite.name} {suite.label(shape)} {mode} {provider.name}")
            case, result = prepare(suite, provider, mode, shape, device, dtype, quick=quick)
            if case is not None:
                result = measure(case, result, device, quick=quick, roofline=roofline)
            del case
            logger.info("%s %s %s %s: %s %s", suite.name, result.shape, mode, provider.name, result.status,
                        result.reason or (f"{result.timing.median_ms:.4g} ms" if result.timing else ""))
            results.append(result)
            if progress is not None:
                progress.update(1)
    finally:
        _references.clear()
    return results
