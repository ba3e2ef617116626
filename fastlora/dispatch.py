"""Which implementation runs an op: a per-op table of ordered candidates, each with its requirements.

AUTO takes the first candidate whose requirements hold and logs, once, why the ones before it did not. An
explicit request (an argument, :func:`use_backend`, ``FASTLORA_BACKEND`` or ``FASTLORA_BACKEND_<OP>``) that
cannot run raises :class:`BackendUnavailableError`; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from ._logging import log_once
from .device import DeviceInfo, device_info


class Backend(str, enum.Enum):
    """An implementation of an op: Triton, the native CUDA or C++ extension, or the PyTorch reference."""

    AUTO = "auto"
    TRITON = "triton"
    CUDA = "cuda"  # csrc/cuda, for GPUs Triton cannot serve
    CPP = "cpp"  # csrc/cpu
    TORCH = "torch"  # the pure-PyTorch reference

    @classmethod
    def parse(cls, value: Backend | str, *, what: str = "backend") -> Backend:
        if isinstance(value, Backend):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(b.value for b in cls)
            raise ValueError(f"{what}: unknown backend {value!r} (expected one of {names})") from None

    def __str__(self) -> str:
        return self.value


_BY_NAME: dict[str, Backend] = {b.value: b for b in Backend}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op here."""


@dataclass(frozen=True)
class Target:
    """What a requirement is checked against: the op, the device and the dtype of the call."""

    op: str
    info: DeviceInfo
    dtype: torch.dtype | None
    native: frozenset[tuple[str, str]] | None  # (op, device type) pairs with a native kernel; None: probe

    def has_native(self, device_type: str) -> bool:
        native = self.native if self.native is not None else _native_kernels()
        return (self.op, device_type) in native


# A requirement returns None when it holds, else the reason it does not.
Requirement = Callable[[Target], "str | None"]


@dataclass(frozen=True)
class OpPolicy:
    """An op's ordered candidates, the dtypes it accepts, and extra requirements per backend."""

    name: str
    candidates: tuple[Backend, ...]
    dtypes: frozenset[torch.dtype] = frozenset({torch.float32, torch.float16, torch.bfloat16})
    extra: tuple[tuple[Backend, Requirement], ...] = ()


@dataclass(frozen=True)
class Decision:
    """The outcome of resolving one op: the backend, why, and why the candidates before it were passed over."""

    op: str
    backend: Backend
    dtype: torch.dtype | None
    reason: str
    rejected: tuple[tuple[Backend, str], ...] = ()


# The policy table. Candidates are in order of preference; each backend's requirements are in _REQUIREMENTS
# below, and an op's own extra ones sit in its row. A new op adds its row here when its kernels land.
_POLICIES: dict[str, OpPolicy] = {
    "swiglu": OpPolicy("swiglu", (Backend.TRITON, Backend.CPP, Backend.TORCH)),
    # dtype is the output's: the packed weight is uint8 whatever it dequantizes to.
    "nf4_dequantize": OpPolicy("nf4_dequantize", (Backend.TRITON, Backend.CUDA, Backend.CPP, Backend.TORCH)),
    "nf4_matmul": OpPolicy("nf4_matmul", (Backend.TRITON, Backend.TORCH),
                           extra=((Backend.TRITON, lambda t: _tensor_core_dot(t)),)),
    "glu": OpPolicy("glu", (Backend.TRITON, Backend.TORCH)),
    "rope": OpPolicy("rope", (Backend.TRITON, Backend.TORCH)),
    "cross_entropy": OpPolicy("cross_entropy", (Backend.TRITON, Backend.TORCH)),
}
_requests: contextvars.ContextVar[Mapping[str, Backend]] = contextvars.ContextVar(
    "fastlora_backend", default=MappingProxyType({}))
_GLOBAL = "*"


def register_op(name: str, candidates: Sequence[Backend | str], *, dtypes: Sequence[torch.dtype] | None = None,
                extra: Sequence[tuple[Backend, Requirement]] = ()) -> OpPolicy:
    """Add or replace a row of the policy table (for ops defined outside fastlora, and for tests).

    Example:
        >>> register_op("my_op", [Backend.TRITON, Backend.TORCH])
    """
    if not name.isidentifier():
        raise ValueError(f"register_op: op name {name!r} must be an identifier")
    backends = tuple(Backend.parse(b, what=f"register_op({name!r})") for b in candidates)
    if Backend.AUTO in backends or not backends or backends[-1] is not Backend.TORCH:
        raise ValueError(f"register_op({name!r}): candidates must end with the torch reference and omit auto")
    policy = OpPolicy(name, backends, frozenset(dtypes) if dtypes else OpPolicy.dtypes, tuple(extra))
    _POLICIES[name] = policy
    _resolve_cached.cache_clear()
    return policy


def unregister_op(name: str) -> None:
    """Remove a row added by :func:`register_op`."""
    _POLICIES.pop(name, None)
    _resolve_cached.cache_clear()


def policies() -> dict[str, OpPolicy]:
    """The policy table: every op and its candidates, in order.

    Example:
        >>> policies()["swiglu"].candidates
        (<Backend.TRITON: 'triton'>, <Backend.CPP: 'cpp'>, <Backend.TORCH: 'torch'>)
    """
    return dict(_POLICIES)


def resolve_backend(op: str, device: DeviceInfo | torch.device | str | int | None = None,
                    dtype: torch.dtype | None = None, requested: Backend | str = Backend.AUTO, *,
                    native: frozenset[tuple[str, str]] | None = None) -> tuple[Backend, str]:
    """Pick the backend that runs ``op`` on ``device`` for inputs of ``dtype``.

    Args:
        op: a registered op name, e.g. ``"swiglu"``.
        device: where the op runs; a :class:`DeviceInfo` simulates a machine.
        dtype: the dtype of the op's floating inputs; None skips the dtype requirements.
        requested: AUTO, or a backend that must run (else :class:`BackendUnavailableError`). When AUTO, a
            :func:`use_backend` context, then ``FASTLORA_BACKEND_<OP>``, then ``FASTLORA_BACKEND`` decide.
        native: the ``(op, device_type)`` pairs with a native kernel; None asks the built extension.

    Returns:
        ``(backend, reason)``.

    Example:
        >>> fastlora.resolve_backend("swiglu", "cpu", torch.float32)
        (<Backend.CPP: 'cpp'>, 'cpp: native C++ kernel')
    """
    d = decide(op, device, dtype, requested, native=native)
    return d.backend, d.reason


def decide(op: str, device: DeviceInfo | torch.device | str | int | None = None,
           dtype: torch.dtype | None = None, requested: Backend | str = Backend.AUTO, *,
           native: frozenset[tuple[str, str]] | None = None) -> Decision:
    """Like :func:`resolve_backend`, with the candidates passed over and their reasons.

    Example:
        >>> from fastlora.testing import SIMULATED_DEVICES
        >>> d = decide("swiglu", SIMULATED_DEVICES["t4"], torch.bfloat16)
        >>> d.backend, d.rejected[0][1]
        (<Backend.TORCH: 'torch'>, 'sm_75 has no bf16 in Triton: use float16')
    """
    info = device if isinstance(device, DeviceInfo) else device_info(device)
    # decide() runs on every op call: a dict lookup spares the common case the enum machinery.
    parsed = _BY_NAME.get(requested) if isinstance(requested, str) else None
    want, source = _requested(op, parsed or Backend.parse(requested, what=f"{op}: requested"))
    return _resolve_cached(op, info, dtype, want, source, native)


def would_run(op: str, backend: Backend, device: DeviceInfo | torch.device | str | int | None = None,
              dtype: torch.dtype | None = None, *, native: frozenset[tuple[str, str]] | None = None) -> bool:
    """Whether a call of ``op`` here would run on ``backend``: for a fast path that a caller takes only when it
    would run, serving the call with other ops otherwise (as ``lora_linear`` does with ``nf4_matmul`` for a few
    rows over NF4, else dequantize and GEMM).

    A request for every op (``use_backend("cpp")``, ``FASTLORA_BACKEND``) that ``op`` cannot honour answers
    False instead of raising: the other path resolves its own ops under the same request, and raises there if
    they cannot run either. A request naming ``op`` itself (``use_backend(op=...)``, ``FASTLORA_BACKEND_<OP>``)
    is resolved as the op's call would be, and raises as it would.

    Example:
        >>> with fastlora.use_backend("cpp"):
        ...     would_run("nf4_matmul", Backend.TRITON, "cpu", torch.float32)
        False
    """
    info = device if isinstance(device, DeviceInfo) else device_info(device)
    want, source, every_op = _request(op, Backend.AUTO)
    if want is Backend.AUTO or not every_op:
        return _resolve_cached(op, info, dtype, want, source, native).backend is backend
    policy = _POLICIES.get(op)
    if want is not backend or policy is None or backend not in policy.candidates:
        return False
    if dtype is not None and dtype not in policy.dtypes:
        return False
    return _why_not(policy, backend, Target(op, info, dtype, native), auto=False) is None


def plan(device: DeviceInfo | torch.device | str | int | None = None, dtype: torch.dtype | None = None, *,
         native: frozenset[tuple[str, str]] | None = None) -> list[Decision]:
    """Every registered op's decision on ``device`` at ``dtype`` (default: the device's compute dtype).

    Example:
        >>> [(d.op, d.backend.value) for d in plan(SIMULATED_DEVICES["h100"])]
        [('swiglu', 'triton')]
    """
    info = device if isinstance(device, DeviceInfo) else device_info(device)
    dtype = dtype or info.compute_dtype
    return [decide(op, info, dtype, native=native) for op in sorted(policies())]


def capable_backends(op: str, device: DeviceInfo | torch.device | str | int | None = None,
                     dtype: torch.dtype | None = None, *,
                     native: frozenset[tuple[str, str]] | None = None) -> list[Backend]:
    """The backends AUTO may choose for ``op`` here, in the table's order (the first is the static choice):
    the candidates a measured choice times (:mod:`fastlora.tuning`).

    Example:
        >>> capable_backends("swiglu", "cpu", torch.float32)
        [<Backend.CPP: 'cpp'>, <Backend.TORCH: 'torch'>]
    """
    info = device if isinstance(device, DeviceInfo) else device_info(device)
    policy = _POLICIES.get(op)
    if policy is None:
        raise ValueError(f"capable_backends: unknown op {op!r} (known: {', '.join(sorted(policies()))})")
    target = Target(op, info, dtype, native)
    return [b for b in policy.candidates if _why_not(policy, b, target, auto=True) is None]


def is_auto(op: str, requested: Backend | str = Backend.AUTO) -> bool:
    """Whether nothing asks for a backend for this call of ``op`` (argument, use_backend, FASTLORA_BACKEND*): only
    then may the choice be measured."""
    parsed = _BY_NAME.get(requested) if isinstance(requested, str) else requested
    return _requested(op, parsed or Backend.parse(requested, what=f"{op}: requested"))[0] is Backend.AUTO


def request_state(*ops: str) -> tuple:
    """What asks for backends for ``ops`` now (``use_backend``'s context, ``FASTLORA_BACKEND`` and the ops'
    ``FASTLORA_BACKEND_<OP>``), as a hashable value: a choice cached under it stays valid while it is equal.

    Example:
        >>> key = ("lora_linear", request_state("lora_linear", "nf4_matmul"))
    """
    ctx = _requests.get()
    env = os.environ
    return (tuple(ctx.items()) if ctx else (), env.get("FASTLORA_BACKEND"),
            *(env.get(_env_names(op)[0]) for op in ops))


@contextlib.contextmanager
def use_backend(backend: Backend | str | None = None, /, **per_op: Backend | str) -> Iterator[None]:
    """Force backends inside a ``with`` block: one for every op, and/or one per op by name.

    An op forced to a backend that cannot run raises :class:`BackendUnavailableError` when called.

    Example:
        >>> with fastlora.use_backend("torch"):            # every op on the reference
        ...     y = fastlora.swiglu(gate, up)
        >>> with fastlora.use_backend(swiglu="triton"):    # one op
        ...     y = fastlora.swiglu(gate, up)
    """
    known = policies()
    update: dict[str, Backend] = {}
    if backend is not None:
        update[_GLOBAL] = Backend.parse(backend, what="use_backend")
    for op, b in per_op.items():
        if op not in known:
            raise ValueError(f"use_backend: unknown op {op!r} (known: {', '.join(sorted(known))})")
        update[op] = Backend.parse(b, what=f"use_backend({op}=...)")
    token = _requests.set({**_requests.get(), **update})
    try:
        yield
    finally:
        _requests.reset(token)


def _requested(op: str, requested: Backend) -> tuple[Backend, str]:
    want, source, _ = _request(op, requested)
    return want, source


def _request(op: str, requested: Backend) -> tuple[Backend, str, bool]:
    """(backend, where the request came from, whether it was made for every op rather than this one)."""
    if requested is not Backend.AUTO:
        return requested, "requested by the caller", False
    ctx = _requests.get()
    if ctx:
        for key, source in ((op, f"use_backend({op}=...)"), (_GLOBAL, "use_backend(...)")):
            if key in ctx:
                return ctx[key], source, key == _GLOBAL
    per_op, every = _env_names(op)
    for var in (per_op, every):
        value = os.environ.get(var)
        if value:
            return Backend.parse(value, what=var), f"{var}={value}", var == every
    return Backend.AUTO, "auto", False


@functools.cache
def _env_names(op: str) -> tuple[str, str]:
    return f"FASTLORA_BACKEND_{op.upper()}", "FASTLORA_BACKEND"


#: Ops that read ``FASTLORA_BACKEND_<OP>`` without backends of their own: setting it stops their variants being
#: measured (fastlora.tuning), as any explicit choice does.
VARIANT_OPS = frozenset({"lora_linear", "lora_qkv", "lora_mlp", "fused_linear_cross_entropy"})


def unknown_backend_variables() -> list[str]:
    """``FASTLORA_BACKEND_<NAME>`` variables set in the environment that name no op: a typo does nothing, so it is
    reported (a WARNING at the first dispatch decision, and in ``fastlora env``).

    Example:
        >>> os.environ["FASTLORA_BACKEND_SWIGGLU"] = "torch"; unknown_backend_variables()
        ['FASTLORA_BACKEND_SWIGGLU']
    """
    known = {_env_names(op)[0] for op in (*_POLICIES, *VARIANT_OPS)}
    return sorted(k for k in os.environ if k.startswith("FASTLORA_BACKEND_") and k not in known)


def _warn_unknown_variables() -> None:
    for name in unknown_backend_variables():
        log_once(logging.WARNING, name, "fastlora: %s is set but names no op (ops: %s): it has no effect", name,
                 ", ".join(sorted(_POLICIES)))


@functools.lru_cache(maxsize=4096)
def _resolve_cached(op: str, info: DeviceInfo, dtype: torch.dtype | None, want: Backend, source: str,
                    native: frozenset[tuple[str, str]] | None) -> Decision:
    _warn_unknown_variables()  # once per new decision: cheap, and a typo is seen before it misleads
    policy = _POLICIES.get(op)
    if policy is None:
        known = ", ".join(sorted(policies()))
        raise ValueError(f"resolve_backend: unknown op {op!r} (known: {known})")
    if dtype is not None and dtype not in policy.dtypes:
        allowed = ", ".join(sorted(str(d).removeprefix("torch.") for d in policy.dtypes))
        raise TypeError(f"{op}: dtype {dtype} is not supported (expected one of {allowed})")
    target = Target(op, info, dtype, native)
    where = f"{info.name} ({info.vendor}{', ' + info.arch if info.arch else ''})"

    if want is not Backend.AUTO:
        if want not in policy.candidates:
            have = ", ".join(b.value for b in policy.candidates)
            raise BackendUnavailableError(
                f"{op}: backend {want} was requested ({source}) but {op} has no {want} implementation "
                f"(it has: {have})")
        why = _why_not(policy, want, target, auto=False)
        if why is not None:
            raise BackendUnavailableError(
                f"{op}: backend {want} was requested ({source}) but cannot run on {where}: {why}")
        return Decision(op, want, dtype, f"{want}: {source}")

    rejected: list[tuple[Backend, str]] = []
    for backend in policy.candidates:
        why = _why_not(policy, backend, target, auto=True)
        if why is None:
            decision = Decision(op, backend, dtype, f"{backend}: {_DESCRIPTION[backend]}", tuple(rejected))
            if rejected:
                level = logging.WARNING if info.is_gpu else logging.INFO
                passed = "; ".join(f"{b}: {r}" for b, r in rejected)
                log_once(level, (op, info, dtype), "%s on %s runs on %s (%s)", op, where, backend, passed)
            return decision
        rejected.append((backend, why))
    raise AssertionError(f"{op}: the torch reference is always a candidate")  # register_op guarantees it


_DESCRIPTION = {
    Backend.TRITON: "Triton kernel",
    Backend.CUDA: "native CUDA kernel",
    Backend.CPP: "native C++ kernel",
    Backend.TORCH: "PyTorch reference",
}


def _why_not(policy: OpPolicy, backend: Backend, t: Target, *, auto: bool) -> str | None:
    why = _REQUIREMENTS[backend](t, auto)
    if why is None:
        for b, requirement in policy.extra:
            if b is backend and (why := requirement(t)) is not None:
                break
    return why


def _triton_ok(t: Target, auto: bool) -> str | None:
    info = t.info
    if info.device_type == "cpu" and auto:
        return "Triton on a CPU only runs in the interpreter, which is for tests: ask for it explicitly"
    if not info.triton_usable:
        return info.triton_reason or "Triton is not usable on this device"
    if info.vendor == "nvidia" and info.capability is not None and info.capability < (7, 5):
        return f"Triton is not used below compute capability 7.5 (this GPU is {info.arch})"
    if t.dtype == torch.bfloat16 and info.is_gpu and not info.bf16:
        return f"{info.arch} has no bf16 in Triton: use float16"
    return None


def _tensor_core_dot(t: Target) -> str | None:
    """A Triton GEMM needs tensor cores from tl.dot: Triton 3.9 compiles it for sm_75 (Turing) as an FMA loop that
    spills (fastlora.benchmarks.static), slower than dequantize + cuBLAS there."""
    info = t.info
    if info.vendor == "nvidia" and info.capability is not None and info.capability < (8, 0):
        return f"Triton emits no tensor-core instructions for tl.dot on {info.arch}"
    return None


def _cuda_ok(t: Target, auto: bool) -> str | None:
    if t.info.vendor != "nvidia":
        return f"the CUDA extension targets NVIDIA GPUs, not {t.info.vendor}"
    if not t.has_native("cuda"):
        return f"the native extension has no CUDA kernel for {t.op} ({_native_error() or 'not built with CUDA'})"
    return None


def _cpp_ok(t: Target, auto: bool) -> str | None:
    if t.info.device_type != "cpu":
        return f"the C++ kernel runs on the CPU, not on {t.info.device_type}"
    if not t.has_native("cpu"):
        return f"the native extension has no CPU kernel for {t.op} ({_native_error() or 'not in this build'})"
    return None


_REQUIREMENTS: dict[Backend, Callable[[Target, bool], str | None]] = {
    Backend.TRITON: _triton_ok,
    Backend.CUDA: _cuda_ok,
    Backend.CPP: _cpp_ok,
    Backend.TORCH: lambda t, auto: None,
}


def _native_kernels() -> frozenset[tuple[str, str]]:
    from . import _native

    return _native.kernels()


def _native_error() -> str | None:
    from . import _native

    return _native.load_error()
