"""From a compiled kernel's resources, its SASS and its launch to occupancy, waves and an estimated time.

The model, stated: a kernel takes the longest of (a) the bytes it moves over the HBM bandwidth, (b) its FLOPs over
the tensor-core peak (when its SASS has tensor-core instructions; the FP32 peak otherwise) and (c) its dynamic
warp-instructions over the issue rate, each scaled down to the SMs its grid can occupy, and times the tail of its
last partial wave. Dynamic instructions: the SASS outside loops once per warp, each loop body ``trips`` times.
Latency (a kernel whose resident warps keep too few bytes in flight) is not modelled: occupancy is reported beside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .devices import Device
from .sass import Resources, Sass


@dataclass
class Occupancy:
    ctas_per_sm: int
    occupancy: float  # resident warps / the SM's maximum
    limiter: str


def occupancy(device: Device, res: Resources, warps: int, shared: int) -> Occupancy:
    """CTAs resident per SM, and what limits them (registers, shared memory, warps, CTAs)."""
    regs_per_warp = math.ceil(max(res.registers, 1) * 32 / 256) * 256
    limits = {
        "registers": device.regs_per_sm // (regs_per_warp * warps),
        "shared memory": device.smem_per_sm // (shared + 1024) if shared else device.max_ctas_per_sm,
        "warps": device.max_warps_per_sm // warps,
        "CTAs": device.max_ctas_per_sm,
    }
    limiter = min(limits, key=limits.get)
    ctas = max(0, limits[limiter])
    return Occupancy(ctas, ctas * warps / device.max_warps_per_sm, limiter)


@dataclass
class Estimate:
    ctas: int
    waves: float  # CTAs over the CTAs the whole GPU holds at once
    sm_fraction: float  # share of the SMs the grid can keep busy
    warp_instructions: float  # dynamic, whole kernel
    t_memory: float
    t_compute: float
    t_issue: float
    t_estimate: float
    t_roofline: float  # minimal bytes at full bandwidth, or FLOPs at the tensor peak: the best possible
    bound: str

    @property
    def roofline_share(self) -> float:
        return self.t_roofline / self.t_estimate if self.t_estimate else 0.0


def estimate(device: Device, occ: Occupancy, sass: Sass, grid: tuple[int, ...], warps: int, trips: float,
             traffic: float, min_bytes: float, flops: float) -> Estimate:
    """The time model of the module docstring for one launch."""
    ctas = math.prod(grid)
    resident = max(1, device.sms * occ.ctas_per_sm)
    waves = ctas / resident
    sm_fraction = min(1.0, ctas / device.sms)
    loops = sass.loops()
    in_loops = {id(i) for body in loops for i in body}
    straight = sum(1 for i in sass.instructions if id(i) not in in_loops and i.base != "NOP")
    per_warp = straight + trips * sum(len(body) for body in loops)
    instructions = per_warp * warps * ctas
    peak = device.tensor_flops if sass.tensor_core() else device.fma_flops
    t_memory = traffic / device.hbm_bytes_s / sm_fraction
    t_compute = flops / peak / sm_fraction
    t_issue = instructions / device.issue_rate / sm_fraction
    times = {"memory": t_memory, "compute": t_compute, "issue": t_issue}
    bound = max(times, key=times.get)
    tail = math.ceil(waves) / waves if waves > 1 else 1.0
    t_roofline = max(min_bytes / device.hbm_bytes_s, flops / device.tensor_flops)
    return Estimate(ctas, waves, sm_fraction, instructions, t_memory, t_compute, t_issue, times[bound] * tail,
                    t_roofline, bound)
