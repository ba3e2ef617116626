"""Whole QLoRA training steps: offloaded against in-GPU checkpointing (``fastlora bench --checkpointing``), and the
longest context each setup trains at before running out of memory (``fastlora bench --max-context``): predicted
from a line through the peak memory measured at a few lengths, and checked by training at the lengths around it
where one step is short enough to try (not at the 8B shape's hundreds of thousands of tokens).

The model is the demo's (:func:`fastlora.demo.build_model`): Llama-architecture, random weights, NF4 base when
bitsandbytes is installed, LoRA r=16 on every linear layer; the 8B shape on a GPU, the tiny one for ``--quick``.
A step is one forward and backward of one sequence (the optimizer is the same for every setup and left out).
Setups:

- ``hf``: transformers + PEFT (+ bitsandbytes), torch's checkpoint (activations of each layer recomputed, layer
  inputs kept on the GPU);
- ``fastlora``: the same model after ``fastlora.patch``, same checkpointing;
- ``fastlora-offload``: patched with ``checkpointing="offload"``: layer inputs in CPU memory.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastlora
from fastlora.checkpointing import enable_checkpointing

from .harness import Result
from .timing import Timing

SETUPS = ("hf", "fastlora", "fastlora-offload")
#: Tokens per step of the checkpointing comparison (one sequence each).
STEP_TOKENS = {"gpu": (8192, 32768), "quick": (64,)}


@dataclass
class Step:
    """One setup's training step at one length: median time over the timed steps, peak memory, the first loss."""

    setup: str
    tokens: int
    timing: Timing
    peak_bytes: int
    loss: float


def build(device: torch.device, *, quick: bool, seed: int = 0,
          dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, str]:
    """The benchmark model (PEFT LoRA over an NF4 or dense Llama) on ``device`` in ``dtype`` (default: the
    device's compute dtype), and its description."""
    from fastlora.demo import build_model

    dtype = dtype or fastlora.device_info(device).compute_dtype
    size = "tiny" if quick else "8b"
    model, _, what = build_model(size, device, dtype, four_bit=True, seed=seed)
    return model, f"{size}: {what}"


def configure(model: torch.nn.Module, setup: str) -> None:
    """Put ``model`` in ``setup`` (unpatching whatever was there), checkpointing on."""
    if setup not in SETUPS:
        raise ValueError(f"training benchmark: setup must be one of {SETUPS}, got {setup!r}")
    fastlora.unpatch(model)
    if setup != "hf":
        fastlora.patch(model, checkpointing="offload" if setup == "fastlora-offload" else None)
    enable_checkpointing(model, use_reentrant=False)
    model.train()


def train_step(model: torch.nn.Module, tokens: int, *, seed: int = 0) -> torch.Tensor:
    """One forward and backward of one random sequence of ``tokens`` tokens; returns the detached loss."""
    device = next(model.parameters()).device
    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def measure_step(model: torch.nn.Module, setup: str, tokens: int, *, reps: int = 3) -> Step:
    """Configure ``setup``, run one warm-up step, then ``reps`` timed ones; the peak covers the timed steps."""
    configure(model, setup)
    device = next(model.parameters()).device
    loss = train_step(model, tokens)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        train_step(model, tokens)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return Step(setup, tokens, Timing(statistics.median(times), q[0], q[3], reps), peak, float(loss))


def search_max(fits: Callable[[int], bool], *, start: int, limit: int, resolution: int) -> int:
    """The largest multiple of ``resolution`` in ``[0, limit]`` for which ``fits`` holds, assuming it holds up to
    some length and fails beyond: doubling from ``start`` (the last step clipped to ``limit``), then bisection.
    0 when even ``start`` fails.

    Example:
        >>> search_max(lambda n: n <= 5000, start=1024, limit=1 << 20, resolution=512)
        4608
    """
    if start % resolution or start <= 0 or limit < start:
        raise ValueError(f"search_max: need 0 < start <= limit with start a multiple of resolution, got "
                         f"start={start}, limit={limit}, resolution={resolution}")
    cap = limit // resolution * resolution
    good, n = 0, start
    while fits(n):
        good = n
        if n == cap:
            return good
        n = min(2 * n, cap)
    bad = n
    lo, hi = good // resolution, bad // resolution  # fits(lo * resolution) holds, fits(hi * resolution) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * resolution):
            lo = mid
        else:
            hi = mid
    return lo * resolution


def fit_memory(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares line ``peak = intercept + slope * tokens`` through ``(tokens, peak bytes)`` points.

    With checkpointing and flash attention every term of a step's memory grows linearly with the sequence
    (the layer inputs, one layer's recompute, the loss's chunks or the logits), above the fixed weights.

    Example:
        >>> fit_memory([(1, 12), (2, 14), (3, 16)])
        (10.0, 2.0)
    """
    if len({n for n, _ in points}) < 2:
        raise ValueError(f"fit_memory: need peaks at two lengths at least, got {points}")
    mean_n = sum(n for n, _ in points) / len(points)
    mean_p = sum(p for _, p in points) / len(points)
    slope = sum((n - mean_n) * (p - mean_p) for n, p in points) / sum((n - mean_n) ** 2 for n, _ in points)
    return mean_p - slope * mean_n, slope


@dataclass
class Context:
    """The longest context of one setup: ``predicted`` from the line through the measured peaks, and
    ``verified`` (the longest length a search actually trained at) where a search was affordable."""

    setup: str
    steps: list[Step]
    capacity: int
    predicted: int
    verified: Step | None


def max_context(model: torch.nn.Module, setup: str, *, lengths: tuple[int, ...] = (4096, 8192, 16384),
                verify_below: int = 65536, resolution: int = 1024) -> Context:
    """Measure ``setup``'s peak memory at ``lengths``, predict the longest sequence that fits the GPU (the memory
    the allocator can have: free now plus what it holds), and, when the prediction is under ``verify_below``
    tokens, search for it by training at each probed length until out of memory. Longer contexts are only
    predicted: one step over a few hundred thousand tokens of an 8B model runs for many minutes."""
    configure(model, setup)
    device = next(model.parameters()).device
    steps = [measure_step(model, setup, n, reps=1) for n in lengths]
    intercept, slope = fit_memory([(step.tokens, step.peak_bytes) for step in steps])
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    capacity = free + torch.cuda.memory_reserved(device)
    predicted = max(0, int((capacity - intercept) / slope)) // resolution * resolution

    def fits(tokens: int) -> bool:
        try:
            train_step(model, tokens)
            _sync(device)
            return True
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    verified = None
    if predicted < verify_below:
        start = lengths[0] // resolution * resolution
        best = search_max(fits, start=start, limit=2 * verify_below, resolution=resolution)
        verified = measure_step(model, setup, best, reps=1) if best else None
    return Context(setup, steps, capacity, predicted, verified)


def to_result(step: Step, suite: str, shape: str, dtype: torch.dtype, *, metric: str) -> Result:
    """A results row: ``metric`` is "tokens/s" (the step's throughput) or "tokens" (the longest context)."""
    achieved = step.tokens if metric == "tokens" else step.tokens / (step.timing.median_ms / 1e3)
    kind = "baseline" if step.setup == "hf" else "fastlora"
    return Result(suite, step.setup, kind, "full", f"{shape} S{step.tokens}", str(dtype).removeprefix("torch."),
                  "ok", timing=step.timing, peak_mem_bytes=step.peak_bytes, metric=metric, achieved=float(achieved))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device: torch.device, *, checkpointing: bool, max_ctx: bool, quick: bool,
        out: Callable[[str], None] = print, dtype: torch.dtype | None = None) -> list[Result]:
    """The training benchmarks asked for, as results rows; prints one line per measurement through ``out``.

    The offloaded setup is gated against in-GPU checkpointing of the same patched model (the same loss, since
    the recompute sees the same values); a setup that disagrees gets status "failed" and is not saved.

    Raises:
        ValueError: ``max_ctx`` on a device that is not a GPU (a CPU does not run out of memory: it swaps).
    """
    if max_ctx and device.type != "cuda":
        raise ValueError("--max-context needs a CUDA device: a CPU swaps instead of running out of memory")
    model, what = build(device, quick=quick, dtype=dtype)
    dtype = next(p for p in model.parameters() if p.is_floating_point() and p.requires_grad).dtype
    shape = "tiny" if quick else "8b"
    out(f"training benchmark model: {what}")
    results: list[Result] = []
    if checkpointing:
        for tokens in STEP_TOKENS["quick" if quick else "gpu"]:
            steps = {setup: measure_step(model, setup, tokens) for setup in ("fastlora", "fastlora-offload")}
            base, offload = steps["fastlora"], steps["fastlora-offload"]
            for step in (base, offload):
                result = to_result(step, "checkpointing", shape, dtype, metric="tokens/s")
                if step is offload and abs(offload.loss - base.loss) > 1e-3 * abs(base.loss):
                    result = Result(result.suite, result.provider, result.kind, result.mode, result.shape,
                                    result.dtype, "failed", reason=f"loss {offload.loss} vs {base.loss}")
                results.append(result)
                out(f"checkpointing {step.setup:>16} S{tokens}: {step.timing.median_ms:9.1f} ms/step, "
                    f"peak {step.peak_bytes / 2**30:6.2f} GiB, loss {step.loss:.5f}")
            peak = f", peak {offload.peak_bytes / base.peak_bytes:.3f}" if base.peak_bytes else ""
            out(f"checkpointing S{tokens}: offloaded / in-GPU time "
                f"{offload.timing.median_ms / base.timing.median_ms:.3f}{peak}")
    if max_ctx:
        for setup in SETUPS:
            ctx = max_context(model, setup)
            peaks = ", ".join(f"{s.tokens // 1024}K: {s.peak_bytes / 2**30:.2f} GiB" for s in ctx.steps)
            out(f"max context {setup:>16}: predicted {ctx.predicted:,} tokens from the peaks ({peaks}; "
                f"{ctx.capacity / 2**30:.1f} GiB to fill)")
            # The row's time and peak are those of the longest measured step; its value is the prediction.
            results.append(dataclasses.replace(
                to_result(ctx.steps[-1], "max_context", shape, dtype, metric="tokens"), achieved=float(ctx.predicted),
                shape=f"{shape} predicted from peaks at {'/'.join(str(s.tokens) for s in ctx.steps)}"))
            if ctx.verified is not None:
                results.append(dataclasses.replace(
                    to_result(ctx.verified, "max_context", shape, dtype, metric="tokens"), shape=f"{shape} trained"))
                out(f"max context {setup:>16}: trained at {ctx.verified.tokens:,} tokens, not beyond")
    return results
