"""`fastlora env`: what this machine is, what each op will run on and why, and whether that works."""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable

import torch

from . import _native
from .device import DeviceInfo, device_info
from .dispatch import Backend, BackendUnavailableError, decide, policies


def _swiglu_smoke(backend: Backend, device: torch.device) -> str:
    from .ops.swiglu import swiglu, swiglu_reference

    gate = torch.linspace(-4, 4, 67, device=device)
    up = torch.linspace(1, 2, 67, device=device)
    got = swiglu(gate, up, backend=backend)
    want = swiglu_reference(gate, up)
    err = float((got - want).abs().max())
    if not err <= 1e-5:
        raise AssertionError(f"swiglu on {backend} differs from the reference by {err:.3g}")
    return f"swiglu on {device} matches the reference (max error {err:.1e})"


def _close(op: str, backend: Backend, got: torch.Tensor, want: torch.Tensor, rel: float) -> float:
    """The largest error relative to ``want``'s largest magnitude; AssertionError beyond ``rel``."""
    err = float((got.float() - want.float()).abs().max()) / max(float(want.float().abs().max()), 1e-30)
    if not err <= rel:
        raise AssertionError(f"{op} on {backend} differs from the reference by {err:.3g} of its largest value")
    return err


def _glu_smoke(backend: Backend, device: torch.device) -> str:
    from .ops._library import call
    from .ops.glu import glu_reference

    gu = torch.linspace(-4, 4, 2 * 3 * 34, device=device).view(3, 68)
    err = _close("glu", backend, call("glu_fwd", gu, "silu", backend.value), glu_reference(gu, "silu"), 1e-5)
    return f"glu on {device} matches the reference (max error {err:.1e})"


def _nf4_weight(device: torch.device) -> object:
    from .ops.nf4_weight import quantize_nf4

    g = torch.Generator().manual_seed(0)
    return quantize_nf4(torch.randn(64, 128, generator=g).to(device))


def _nf4_dequantize_smoke(backend: Backend, device: torch.device) -> str:
    from .ops.nf4 import dequantize_nf4

    w = _nf4_weight(device)
    if not torch.equal(dequantize_nf4(w, backend=backend), dequantize_nf4(w, backend="torch")):
        raise AssertionError(f"nf4_dequantize on {backend} decodes other values than the reference")
    return f"nf4_dequantize on {device} equals the reference bit for bit"


def _nf4_matmul_smoke(backend: Backend, device: torch.device) -> str:
    from .ops.nf4 import dequantize_nf4
    from .ops.nf4_matmul import nf4_matmul

    w = _nf4_weight(device)
    x = torch.linspace(-1, 1, 4 * 128, device=device).view(4, 128)
    # The reference on an explicit backend: a report measures nothing (fastlora.tuning) and keeps no decision.
    want = x @ dequantize_nf4(w, backend="torch").t()
    err = _close("nf4_matmul", backend, nf4_matmul(x, w, backend=backend), want, 1e-4)
    return f"nf4_matmul on {device} matches dequantize + matmul (max error {err:.1e})"


def _rope_smoke(backend: Backend, device: torch.device) -> str:
    from .ops.rope import apply_rope, rope_reference

    q = torch.linspace(-1, 1, 2 * 5 * 8, device=device).view(1, 2, 5, 8)
    k = torch.linspace(1, -1, 5 * 8, device=device).view(1, 1, 5, 8)
    angles = torch.outer(torch.arange(5.0, device=device), torch.linspace(0.1, 1, 4, device=device))
    cos, sin = torch.cat([angles.cos()] * 2, -1)[None], torch.cat([angles.sin()] * 2, -1)[None]
    got, want = apply_rope(q, k, cos, sin, backend=backend), rope_reference(q, k, cos, sin)
    err = max(_close("rope", backend, g, w, 1e-5) for g, w in zip(got, want, strict=True))
    return f"rope on {device} matches the reference (max error {err:.1e})"


def _cross_entropy_smoke(backend: Backend, device: torch.device) -> str:
    from .ops.cross_entropy import cross_entropy, cross_entropy_reference

    logits = torch.linspace(-3, 3, 6 * 11, device=device).view(6, 11)
    labels = torch.tensor([1, 0, 10, -100, 5, 7], device=device)
    err = _close("cross_entropy", backend, cross_entropy(logits, labels, backend=backend),
                 cross_entropy_reference(logits, labels), 1e-5)
    return f"cross_entropy on {device} matches the reference (max error {err:.1e})"


# A tiny run of each op, used to prove that the backend chosen for it compiles and computes.
_SMOKE: dict[str, Callable[[Backend, torch.device], str]] = {
    "swiglu": _swiglu_smoke, "glu": _glu_smoke, "nf4_dequantize": _nf4_dequantize_smoke,
    "nf4_matmul": _nf4_matmul_smoke, "rope": _rope_smoke, "cross_entropy": _cross_entropy_smoke}


def collect(device: torch.device | str | None = None) -> dict[str, object]:
    """Everything `fastlora env` reports, as plain data (what ``--json`` prints).

    Example:
        >>> report = collect()
        >>> report["ok"], [op["backend"] for op in report["ops"]]
        (True, ['cpp'])
    """
    info = device_info(device)
    dtype = info.compute_dtype
    errors: list[str] = []
    ops = []
    for op in sorted(policies()):
        try:
            d = decide(op, info, dtype)
        except (BackendUnavailableError, ValueError) as e:
            errors.append(str(e))
            ops.append({"op": op, "backend": None, "dtype": _name(dtype), "reason": str(e), "rejected": []})
            continue
        ops.append({"op": op, "backend": d.backend.value, "dtype": _name(dtype), "reason": d.reason,
                    "rejected": [[b.value, why] for b, why in d.rejected]})
    checks = _run_checks(ops, info)
    errors += [f"{c['op']} on {c['backend']}: {c['detail']}" for c in checks if not c["ok"]]
    return {
        "fastlora": info.versions.get("fastlora"),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": info.to_dict(),
        "native": {"loaded": _native.how_loaded(), "error": _native.load_error(),
                   "kernels": sorted(f"{op}:{dev}" for op, dev in _native.kernels()), "cpu_isa": _cpu_isa()},
        "ops": ops,
        "tuning": _tuning(),
        "checks": checks,
        "warnings": _warnings(info),
        "errors": errors,
        "ok": not errors,
    }


def _cpu_isa() -> str | None:
    """The SIMD path of the C++ CPU kernels here ("avx512", "avx2" or "portable"), None without the extension."""
    if not _native.load() or not hasattr(torch.ops.fastlora, "native_cpu_isa"):
        return None
    try:
        return torch.ops.fastlora.native_cpu_isa()
    except RuntimeError as e:  # FASTLORA_CPU_ISA names a path this CPU lacks
        return f"error: {str(e).strip().splitlines()[0]}"


def _tuning() -> dict[str, object]:
    """The measured decisions kept so far (fastlora.tuning), with their timings."""
    from . import tuning

    t = tuning.tuner()
    return {"enabled": tuning.enabled(), "cache": str(t.path),
            "decisions": {k: {"backend": m.backend, "times_us": m.times_us, "excluded": m.excluded}
                          for k, m in sorted(t.decisions().items())}}


def _run_checks(ops: list[dict], info: DeviceInfo) -> list[dict[str, object]]:
    checks = []
    for entry in ops:
        smoke = _SMOKE.get(entry["op"])
        if smoke is None or entry["backend"] is None:
            continue
        backend = Backend(entry["backend"])
        try:
            detail, ok = smoke(backend, info.torch_device), True
        except Exception as e:  # the point is to report whatever breaks, compiler errors included
            detail, ok = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", False
        checks.append({"op": entry["op"], "backend": backend.value, "ok": ok, "detail": detail})
    return checks


def _warnings(info: DeviceInfo) -> list[str]:
    from .dispatch import unknown_backend_variables

    out = [f"{name} is set but names no op: it has no effect (a typo?)" for name in unknown_backend_variables()]
    v = info.versions
    if v.get("bitsandbytes") is None:
        out.append("bitsandbytes not installed: 4-bit layers will not be patched (pip install 'fastlora[bnb]')")
    for pkg in ("transformers", "peft"):
        if v.get(pkg) is None:
            out.append(f"{pkg} not installed: models cannot be patched")
    if _nvidia_driver_present() and torch.version.cuda is None:
        out.append("NVIDIA driver present but torch has no CUDA (a CPU or ROCm build): the GPU is unused")
    if os.path.exists("/dev/kfd") and torch.version.hip is None:
        out.append("AMD GPU driver present but torch has no ROCm: the GPU is unused")
    if torch.version.cuda is not None and not torch.cuda.is_available():
        out.append(f"torch was built with CUDA {torch.version.cuda} but sees no GPU")
    if info.is_gpu and not info.triton_usable:
        out.append(f"Triton unusable on this GPU ({info.triton_reason}): ops fall back to slower backends")
    if _native.load_error():
        out.append(f"native extension unavailable: {_native.load_error()}")
    if info.device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        out.append("TRITON_INTERPRET=1 is set: Triton kernels run in the (slow) interpreter when asked for")
    return out


def _nvidia_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def format_report(r: dict) -> str:
    """The human-readable `fastlora env` report."""
    d = r["device"]
    lines = [f"fastlora {r['fastlora']}  (Python {r['python']}, {r['platform']})", ""]
    where = d["vendor"] + (f", {d['arch']}" if d["arch"] else "")
    if d["capability"]:
        where += f", compute capability {d['capability'][0]}.{d['capability'][1]}"
    rows = [
        ("Device", f"{d['name']} ({where})"),
        ("Memory", _memory(d["total_memory"], d["free_memory"])),
        ("Precision", _precision(d)),
    ]
    if d["device_type"] == "cpu":
        rows.append(("CPU features", ", ".join(d["cpu_features"]) or "none detected"))
    rows.append(("Triton", ("usable: " if d["triton_usable"] else "not used: ") + d["triton_reason"]))
    native = r["native"]
    rows.append(("Native ext", native["loaded"] or f"unavailable ({native['error']})"))
    if native.get("cpu_isa"):
        rows.append(("CPU SIMD path", f"{native['cpu_isa']} (C++ NF4 dequantize; FASTLORA_CPU_ISA=avx512|avx2|portable "
                                      "forces one)"))
    versions = d["versions"]
    rows.append(("Versions", ", ".join(f"{k} {versions.get(k) or '-'}" for k in
                                       ("torch", "cuda", "hip", "triton", "transformers", "peft", "bitsandbytes"))))
    width = max(len(k) for k, _ in rows) + 2
    lines += [f"{k:<{width}}{v}" for k, v in rows]

    lines += ["", f"Ops (at {d['compute_dtype']})"]
    op_width = max((len(o["op"]) for o in r["ops"]), default=0) + 2
    for o in r["ops"]:
        reason = o["reason"].removeprefix(f"{o['backend']}: ")
        lines.append(f"  {o['op']:<{op_width}}{o['backend'] or 'ERROR':<8}{reason}")
        for backend, why in o["rejected"]:
            lines.append(f"  {'':<{op_width}}{'':<8}passed over {backend}: {why}")
    tuned = r.get("tuning")
    if tuned:
        state = f"on, kept in {tuned['cache']}" if tuned["enabled"] else "off (FASTLORA_TUNE=0): the table above"
        lines += ["", f"Measured choices ({state})"]
        for key, m in tuned["decisions"].items():
            times = ", ".join(f"{b} {t} us" for b, t in m["times_us"].items())
            excluded = "".join(f"; {b} excluded: {why}" for b, why in m["excluded"].items())
            lines.append(f"  {key}  ->  {m['backend']}  ({times}{excluded})")
        if not tuned["decisions"]:
            lines.append("  none yet: each op is timed on this device at its first call of a new size")
    if r["checks"]:
        lines += ["", "Checks"]
        for c in r["checks"]:
            lines.append(f"  {c['op']:<{op_width}}{c['backend']:<8}{'ok' if c['ok'] else 'FAILED':<8}{c['detail']}")
    if r["warnings"]:
        lines += ["", "Warnings"] + [f"  - {w}" for w in r["warnings"]]
    if r["errors"]:
        lines += ["", "Errors"] + [f"  - {e}" for e in r["errors"]]
    lines += ["", "Status: " + ("OK" if r["ok"] else "BROKEN (see Errors)")]
    return "\n".join(lines)


def _precision(d: dict) -> str:
    text = f"bf16 {_yes(d['bf16'])}, tf32 {_yes(d['tf32'])}, recommended dtype {d['compute_dtype']}"
    if d["device_type"] != "cpu":
        return text
    # The CPU policy (device.CPU_COMPUTE_DTYPE): fp32 everywhere, bf16 only when asked for.
    if d["bf16"]:
        return text + " (fastlora's CPU default; bf16 runs natively here: --dtype bfloat16 for demo and bench)"
    return text + " (fastlora's CPU default; no native bf16 on this CPU)"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _memory(total: int | None, free: int | None) -> str:
    if total is None:
        return "unknown"
    free_text = f", {free / 2**30:.1f} GiB free" if free is not None else ""
    return f"{total / 2**30:.1f} GiB total{free_text}"
