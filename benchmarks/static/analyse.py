"""One row per (case, kernel launch, device): what the compiler made and what the model estimates."""

from __future__ import annotations

import math

from . import amdgcn
from .cases import Case, all_cases
from .compile import capture, compile_launch
from .devices import DEVICES, Device
from .estimate import estimate, occupancy
from .sass import disassemble, resources


def _widths(counter: dict[int, int]) -> str:
    return " ".join(f"{bits}b:{n}" for bits, n in sorted(counter.items()))


def _analyse_amd(case: Case, device: Device) -> list[dict]:
    """What the compiler made for an AMD GPU (the launchers configured for 64-wide wavefronts)."""
    from fastlora.kernels import _utils

    _utils.SIMULATED_WAVEFRONT = 64
    try:
        launches = capture(lambda: case.launcher((device.sms, 0)))
    finally:
        _utils.SIMULATED_WAVEFRONT = None
    rows = []
    for launch in launches:
        compiled = compile_launch(launch, device.target)
        info = amdgcn.read(compiled.asm["amdgcn"])
        rows.append({
            "case": case.name, "kind": case.kind, "kernel": launch.name, "device": device.name,
            "target": device.target, "regs": info["vgprs"], "spills": info["spills"],
            "smem_kb": round(info["lds"] / 1024, 1), "warps": compiled.metadata.num_warps,
            "ctas": math.prod(launch.grid),
            "loads": _widths(info["load_widths"]), "stores": _widths(info["store_widths"]),
            "load_widths": info["load_widths"], "store_widths": info["store_widths"],
            "tensor_core": f"MFMA:{info['mfma']}" if info["mfma"] else "", "bound": "", "est_us": "",
            "roofline_pct": "",
        })
    return rows


def analyse(case: Case, device: Device) -> list[dict]:
    """The rows of one case on one device (one per kernel launch its launcher makes)."""
    if device.target.startswith("gfx"):
        return _analyse_amd(case, device)
    rows = []
    for launch in capture(lambda: case.launcher((device.sms, int(device.target.removeprefix("sm")) // 10))):
        compiled = compile_launch(launch, device.target)
        capability = int(device.target.removeprefix("sm"))
        res = resources(compiled.asm["ptx"], capability)
        sass = disassemble(compiled.asm["cubin"])
        warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
        occ = occupancy(device, res, warps, shared)
        values = launch.values()
        # A GEMM's K loop runs over its slice of the reduction (the whole of it unless the launcher split it).
        trips = min(values["Q_SPLIT"], values["Q"]) / values["BQ"] if "Q_SPLIT" in values else case.trips
        est = estimate(device, occ, sass, launch.grid, warps, trips, case.traffic, case.min_bytes, case.flops)
        loop = sass.main_loop()
        widths = sass.global_widths()
        row = {
            "case": case.name, "kind": case.kind, "kernel": launch.name, "device": device.name,
            "target": device.target, "regs": res.registers, "spills": res.spill_stores + res.spill_loads,
            "smem_kb": round(shared / 1024, 1), "warps": warps, "occupancy": round(occ.occupancy, 3),
            "limiter": occ.limiter, "ctas": est.ctas, "waves": round(est.waves, 2),
            "loads": _widths(widths["load"]), "stores": _widths(widths["store"]),
            "load_widths": dict(widths["load"]), "store_widths": dict(widths["store"]),
            "tensor_core": " ".join(f"{op}:{n}" for op, n in sass.tensor_core().items()),
            "loop_instr": len(loop), "bound": est.bound, "est_us": round(est.t_estimate * 1e6, 1),
            "roofline_pct": round(100 * est.roofline_share, 1),
        }
        if case.mnk:
            row["mnk"] = case.mnk
        if case.weights and loop and case.kind == "gemm":
            # One trip of the K loop streams a BQ x BP tile of weights, its body run by every warp of the CTA.
            row["instr_per_weight"] = round(len(loop) * warps / (values["BQ"] * values["BP"]), 3)
        rows.append(row)
    return rows


# What cuBLAS reaches of a device's limits, assumed for the alternative to the fused NF4 GEMM: 80% of the dense
# bf16 peak (an H100 measures ~800 of 989 TFLOP/s on an 8192^3 product, TARGETS.md) and 90% of HBM bandwidth.
CUBLAS_COMPUTE, CUBLAS_MEMORY = 0.8, 0.9


def dequantize_then_cublas_us(device: Device, dequant_us: float, m: int, n: int, k: int) -> float:
    """The other way to compute an NF4 GEMM, by the same model: the dequantize kernel's estimate, then a cuBLAS
    GEMM reading the dense bf16 weight (``[m, k] x [k, n]``, either orientation)."""
    gemm = max(2 * (n * k + m * (n + k)) / (CUBLAS_MEMORY * device.hbm_bytes_s),
               2 * m * n * k / (CUBLAS_COMPUTE * device.tensor_flops))
    return dequant_us + gemm * 1e6


def analyse_all(devices: list[str], only: str | None = None) -> list[dict]:
    unknown = [d for d in devices if d not in DEVICES]
    if unknown:
        raise ValueError(f"unknown device {unknown}; known: {', '.join(DEVICES)}")
    cases = all_cases()
    chosen = [c for c in cases if not only or only in c.name]
    if any(c.kind == "gemm" for c in chosen):  # the comparison needs the dequantize's estimate
        chosen += [c for c in cases if c.kind == "dequant" and c not in chosen]
    rows = []
    for case in chosen:
        for name in devices:
            rows += analyse(case, DEVICES[name])
    for row in rows:
        if row["kind"] == "gemm" and row["est_us"] != "":
            dequant = next(r for r in rows if r["kind"] == "dequant" and r["device"] == row["device"])
            m, n, k = row["mnk"]
            alt = dequantize_then_cublas_us(DEVICES[row["device"]], dequant["est_us"], m, n, k)
            row["vs_dequant_cublas"] = round(alt / row["est_us"], 2)
    return rows
