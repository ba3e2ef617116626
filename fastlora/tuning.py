"""Measured dispatch: AUTO takes, among the backends that can run an op here, the fastest one that passed a
self-check against the reference, decided once per (device, dtype, shape bucket) and kept on disk.

The static table (:mod:`fastlora.dispatch`) says what can run; it cannot know what is fastest on every device a
user has. So the first call of an op for a key times each capable backend on that call's own inputs (a warm-up,
then repeats within a time budget; CUDA events on a GPU) after checking its output against the reference
backend's: a backend whose result is wrong (a miscompiled kernel on a new GPU or driver) is excluded, with a
WARNING naming it. The decision is written to a JSON file keyed by the versions of torch, triton and fastlora (a
version change starts afresh) and read at the next start, so runs are reproducible. Nothing is measured when a
backend is asked for (argument, ``use_backend``, ``FASTLORA_BACKEND*``), with ``FASTLORA_TUNE=0``, while
``torch.compile`` traces or a CUDA graph captures: the cached or static choice runs there.

Environment: ``FASTLORA_TUNE=0`` (the static table only), ``FASTLORA_TUNING_CACHE=PATH`` (default
``~/.cache/fastlora/tuning.json``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._logging import logger
from .dispatch import Backend, capable_backends, decide, is_auto, request_state

#: Wall time one candidate may take to be timed, per key (after its warm-up); at least 3 rounds are made.
BUDGET_S = 0.05
MIN_REPEATS, MAX_REPEATS = 3, 25


@dataclass
class Measurement:
    """How one key was decided: the backend, each candidate's median time and the ones excluded, with why."""

    backend: str
    times_us: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    spent_s: float = 0.0


# True inside ``off()``: this context (thread, task) measures nothing, whatever the environment says.
_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("fastlora_tuning_off", default=False)


def enabled() -> bool:
    """Whether choices may be measured here: not with ``FASTLORA_TUNE=0``, not inside :func:`off`."""
    return not _OFF.get() and os.environ.get("FASTLORA_TUNE", "1") != "0"


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Measure nothing inside (the static or kept choices run), for this context only: the process environment
    and other threads are left alone.

    Example:
        >>> with tuning.off():
        ...     loss = model(**batch).loss      # e.g. on meta tensors, which have no time to measure
    """
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def state() -> tuple[bool, str | None]:
    """The settings a decision depends on (:func:`enabled`, ``FASTLORA_TUNING_CACHE``): a choice cached in memory
    under them stays valid while they are equal."""
    return enabled(), os.environ.get("FASTLORA_TUNING_CACHE")


def _versions() -> dict[str, str]:
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton missing or broken: the choice is then among the other backends
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "fastlora": __version__}


class Tuner:
    """The decisions made so far, loaded from and saved to ``path`` (thread-safe).

    Example:
        >>> tuner = Tuner(Path("/tmp/tuning.json"))
        >>> tuner.get("swiglu|cpu|float32|2**20")
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._decisions: dict[str, Measurement] | None = None

    def _load(self) -> dict[str, Measurement]:
        if self._decisions is None:
            self._decisions = {}
            try:
                stored = json.loads(self.path.read_text())
            except (OSError, ValueError):
                stored = None
            if isinstance(stored, dict) and stored.get("versions") == _versions():
                self._decisions = {k: Measurement(**v) for k, v in stored.get("decisions", {}).items()}
        return self._decisions

    def get(self, key: str) -> Measurement | None:
        with self._lock:
            return self._load().get(key)

    def put(self, key: str, measurement: Measurement) -> None:
        with self._lock:
            self._load()[key] = measurement
            data = {"versions": _versions(), "decisions": {k: asdict(v) for k, v in self._decisions.items()}}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
                os.replace(tmp, self.path)  # atomic: another process reads the old file or the new one
            except OSError as e:
                logger.warning("fastlora tuning: cannot save %s (%s); the decisions hold for this process",
                               self.path, e)

    def decisions(self) -> dict[str, Measurement]:
        with self._lock:
            return dict(self._load())


_TUNERS: dict[Path, Tuner] = {}
_TUNERS_LOCK = threading.Lock()


def tuner() -> Tuner:
    """The tuner of ``$FASTLORA_TUNING_CACHE`` (one per path in a process)."""
    path = Path(os.environ.get("FASTLORA_TUNING_CACHE") or Path.home() / ".cache" / "fastlora" / "tuning.json")
    with _TUNERS_LOCK:
        return _TUNERS.setdefault(path, Tuner(path))


def bucket(n: int) -> str:
    """A size's bucket: the power of two at or above it (shapes between two powers share a decision)."""
    return f"2**{max(0, int(n) - 1).bit_length()}"


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _once_us(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``run()`` in microseconds (synchronised on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e6


def choose(op: str, device: torch.device, dtype: torch.dtype, requested: Backend | str, size: int,
           run: Callable[[Backend], object], same: Callable[[object, object], bool], part: str = "") -> Backend:
    """The backend this call of ``op`` runs on: measured once per key when AUTO decides, else the static choice.

    Args:
        op: a registered op.
        device, dtype: where and in what the call computes.
        requested: the call's backend argument (an explicit one is never tuned).
        size: the call's size (elements or rows) that buckets the decision.
        run: runs the call on a backend and returns its output (no side effects on the inputs).
        same: whether a candidate's output matches the reference backend's within the op's tolerance.
        part: which of the op's calls (``"fwd"``, ``"bwd"``): each is decided on its own.

    Example:
        >>> b = choose("swiglu", gate.device, gate.dtype, "auto", gate.numel(),
        ...            lambda b: _impl(b, gate, up), lambda got, ref: torch.equal(got, ref))
    """
    if not is_auto(op, requested) or not enabled():
        return decide(op, device, dtype, requested).backend
    # The hot path: a decision already made in this process, by the file it is kept in.
    fast = (os.environ.get("FASTLORA_TUNING_CACHE"), op, part, device, dtype, max(0, int(size) - 1).bit_length())
    hit = _DECIDED.get(fast)
    if hit is not None:
        return hit
    # Asked once per key and process: it also loads what a backend needs (the native extension).
    candidates = capable_backends(op, device, dtype)
    static = decide(op, device, dtype, requested).backend
    # TORCH first: it is the reference every other candidate is checked against (register_op guarantees it).
    names = [Backend.TORCH.value] + [b.value for b in candidates if b is not Backend.TORCH]
    chosen = _decided(f"{op}.{part}" if part else op, device, dtype, bucket(size), names, static.value,
                      lambda name: run(Backend(name)), same)
    if chosen is None:
        return static
    _DECIDED[fast] = Backend(chosen)
    return Backend(chosen)


def choose_variant(op: str, device: torch.device, dtype: torch.dtype, shape: str,
                   variants: Sequence[str], run: Callable[[str], object],
                   same: Callable[[object, object], bool], *, tune: bool = True) -> str:
    """Which of an op's ways of computing a call (its variants: a fused kernel or two steps, a wider branch, ...)
    runs: the fastest that agrees with the first, measured once per key; the first where nothing may be measured.

    Args:
        op: the op (with its part, e.g. ``"lora_linear.train"``).
        device, dtype: where and in what the call computes.
        shape: the call's shape key (sizes that change the answer; bucket the ones that vary by call).
        variants: the variants that can run here, the static choice first (also the reference of the check).
        run: runs the call as a variant and returns its outputs; inputs untouched (torch's RNG is restored).
        same: whether a variant's outputs match the first's within the op's tolerance.
        tune: False when the caller asked for a backend (an explicit choice is never tuned).

    Example:
        >>> v = choose_variant("lora_linear.train", x.device, x.dtype, "2**8x128x344r16",
        ...                    ["dense", "fp32_branch"], run, close_max(x.dtype))
    """
    static = variants[0]
    if len(variants) < 2 or not tune or not enabled():
        return static
    fast = (os.environ.get("FASTLORA_TUNING_CACHE"), op, shape, device, dtype, tuple(variants))
    hit = _DECIDED.get(fast)
    if hit is not None:
        return hit
    chosen = _decided(op, device, dtype, shape, list(variants), static, run, same)
    if chosen is None:
        return static
    _DECIDED[fast] = chosen
    return chosen


# Decisions made or read in this process, by (cache file, op, part or shape, device, dtype, ...): a dict lookup per
# call once decided (the key string, the tuner's lock and the device probe cost ~12 us a call).
_DECIDED: dict[tuple, object] = {}


def _decided(name: str, device: torch.device, dtype: torch.dtype, shape: str, candidates: list[str], static: str,
             run: Callable[[str], object], same: Callable[[object, object], bool]) -> str | None:
    """The kept or measured choice among ``candidates`` (the first is the reference); None where nothing may be
    measured now (then the static choice runs)."""
    key = f"{name}|{_device_name(device)}|{str(dtype).removeprefix('torch.')}|{shape}"
    t = tuner()
    known = t.get(key)
    # A kept choice that cannot run here now (an extension that no longer builds) is measured afresh.
    if known is not None and known.backend in candidates:
        return known.backend
    if len(candidates) < 2:
        return candidates[0]
    if torch.compiler.is_compiling() or _capturing(torch.device(device)):
        return None
    with t._lock:  # one measurement per key, even when threads race to the first call
        known = t.get(key)
        if known is not None and known.backend in candidates:
            return known.backend
        measurement = _measure(key, candidates, static, torch.device(device), run, same)
        t.put(key, measurement)
    return measurement.backend


def _measure(key: str, candidates: list[str], static: str, device: torch.device, run: Callable[[str], object],
             same: Callable[[object, object], bool]) -> Measurement:
    start = time.perf_counter()
    m = Measurement(static)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # a candidate's dropout must not move the run's RNG
        reference = run(candidates[0])
        for c in candidates:
            try:
                out = reference if c == candidates[0] else run(c)  # the warm-up, and the output checked
                if not same(out, reference):
                    raise ValueError("its result differs from the reference's")
            except Exception as e:  # a broken kernel is excluded, never chosen
                m.excluded[c] = str(e)[:200]
                logger.warning("fastlora tuning: %s excluded for %s: %s", c, key, m.excluded[c])
        timed = {c: [] for c in candidates if c not in m.excluded}
        # In rounds, each candidate once per round: a machine that slows down for a while slows them all alike.
        deadline = time.perf_counter() + BUDGET_S * len(timed)
        rounds = 0
        while timed and (rounds < MIN_REPEATS or (rounds < MAX_REPEATS and time.perf_counter() < deadline)):
            for c, times in timed.items():
                times.append(_once_us(lambda c=c: run(c), device))
            rounds += 1
    m.times_us = {c: round(statistics.median(times), 2) for c, times in timed.items()}
    if m.times_us:
        m.backend = min(m.times_us, key=m.times_us.get)
    m.spent_s = round(time.perf_counter() - start, 4)
    logger.info("fastlora tuning: %s -> %s (%s; %.3f s spent)", key, m.backend,
                ", ".join(f"{c} {t} us" for c, t in m.times_us.items()), m.spent_s)
    return m


# Choices made in this process, by (op, train, device, dtype, rows' power of two, shape, what asks for backends,
# the tuning settings): one dict lookup a call once made (the full path costs ~40 us: too much for every
# projection of every step).
_CHOICES: dict[tuple, str] = {}


def measured_variant(op: str, x: torch.Tensor, shape: tuple, options: Callable[[], list[str]],
                     run: Callable[[str, Callable[[torch.Tensor], torch.Tensor] | None], tuple[torch.Tensor, ...]],
                     train: bool) -> str:
    """Which of an op's ``options()`` (the static choice first) computes this call: where several can, the one
    with the fastest forward (and backward, when training) on this device, measured once per shape and kept
    (:func:`choose_variant`).

    ``run(variant, grad)`` computes the call and returns the outputs checked against the first option's; when
    ``grad`` is given (training), also the backward, with ``grad(y)`` as the upstream gradient of an output ``y``
    (the same for every variant). It leaves the inputs and parameters untouched (no ``.grad`` accumulated).
    ``x``'s rows, device and dtype, and ``shape`` (what else changes the options or their speed) key the choice.
    Under torch.compile the static choice is traced (the measuring and its context variables stay out of graphs).
    """
    if torch.compiler.is_compiling():
        return options()[0]
    key = (op, train, x.device, x.dtype, max(0, x.shape[0] - 1).bit_length(), shape,
           request_state(op, "nf4_matmul"), state())
    chosen = _CHOICES.get(key)
    if chosen is not None:
        return chosen
    found = options()
    if len(found) < 2:
        chosen = found[0]
    else:
        probes: dict[tuple, torch.Tensor] = {}

        def grad(y: torch.Tensor) -> torch.Tensor:  # drawn under the measuring's own RNG state, once per shape
            key = (tuple(y.shape), y.dtype)
            if key not in probes:
                probes[key] = torch.randn(y.shape, dtype=y.dtype, device=y.device)
            return probes[key]

        def timed(variant: str) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return run(variant, grad if train else None)

        name = "x".join(str(n) for n in _ints(shape))
        chosen = choose_variant(f"{op}.{'train' if train else 'infer'}", x.device, x.dtype,
                                f"{bucket(x.shape[0])}x{name}", found, timed, close_max(x.dtype), tune=is_auto(op))
    if not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):  # capture: static, not kept
        _CHOICES[key] = chosen
    return chosen


def _ints(value: object) -> list[int]:
    """The integers in a nested shape key, in order (what names a decision in the tuning file)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return [n for v in value for n in _ints(v)] if isinstance(value, tuple) else []


def _device_name(device: torch.device | str) -> str:
    from .device import device_info

    info = device_info(device)
    return f"{info.device_type}:{info.name}"


def close(dtype: torch.dtype, ulps: float = 4.0) -> Callable[[object, object], bool]:
    """An op's self-check for a floating result (a tensor or a tuple of them): within ``ulps`` units of ``dtype``'s
    precision of the reference, relative, with as much absolute slack near zero."""
    eps = torch.finfo(dtype).eps * ulps

    def same(got: object, ref: object) -> bool:
        got, ref = (got, ref) if isinstance(got, tuple | list) else ((got,), (ref,))
        return len(got) == len(ref) and all(
            g.shape == r.shape and g.dtype == r.dtype and torch.allclose(g.float(), r.float(), rtol=eps, atol=eps)
            for g, r in zip(got, ref, strict=True))

    return same


#: The least relative error ``close_max`` allows: fp32 results of long reductions summed in another order (a GEMM
#: split differently, the loss on the logits or by chunks) differ by ~1e-6..1e-5 of their largest magnitude, more than
#: a few fp32 ulps; garbage from a broken kernel is off by far more.
SUMMATION_SLACK = 2.0 ** -13


def close_max(dtype: torch.dtype, ulps: float = 8.0) -> Callable[[object, object], bool]:
    """A self-check for variants that round differently (a branch in fp32 or in ``dtype``; another summation
    order): each tensor within ``ulps`` units of ``dtype``'s precision (at least :data:`SUMMATION_SLACK`) of the
    reference's largest magnitude. A miscompiled kernel's garbage is far outside it."""
    eps = max(torch.finfo(dtype).eps * ulps, SUMMATION_SLACK)

    def within(g: torch.Tensor, r: torch.Tensor) -> bool:
        if g.shape != r.shape or g.dtype != r.dtype or not bool(torch.isfinite(g).all()):
            return False
        if g.numel() == 0:
            return True
        g, r = g.float(), r.float()
        return float((g - r).abs().max()) <= eps * float(r.abs().max())

    def same(got: object, ref: object) -> bool:
        got, ref = (got, ref) if isinstance(got, tuple | list) else ((got,), (ref,))
        return len(got) == len(ref) and all(within(g, r) for g, r in zip(got, ref, strict=True))

    return same
