"""The devices the static estimates are made for: their published limits (spec sheets), not measurements.

Issue rate: SMs x 4 warp schedulers x clock, one warp-instruction each per cycle. Per-SM limits by compute
capability (CUDA programming guide, "Technical Specifications per Compute Capability").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    target: str  # the compile target of fastlora.benchmarks.static.compile.targets()
    sms: int
    clock_ghz: float  # boost clock
    hbm_bytes_s: float
    tensor_flops: float  # dense bf16 (fp16 on Turing), per second
    fma_flops: float  # fp32 non-tensor, per second
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 228 * 1024  # usable by CTAs on sm_90 (227 KB per CTA at most)

    @property
    def issue_rate(self) -> float:
        """Warp-instructions per second over the whole GPU."""
        return self.sms * 4 * self.clock_ghz * 1e9


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("H100 SXM", "sm90", 132, 1.98, 3.35e12, 989e12, 67e12),
    Device("H200", "sm90", 132, 1.98, 4.8e12, 989e12, 67e12),
    Device("A100 80GB", "sm80", 108, 1.41, 2.04e12, 312e12, 19.5e12, smem_per_sm=164 * 1024),
    Device("T4", "sm75", 40, 1.59, 0.32e12, 65e12, 8.1e12, max_warps_per_sm=32, max_ctas_per_sm=16,
           smem_per_sm=64 * 1024),
    # 304 CUs; what the compiler made is reported, not yet a time (no AMD model).
    Device("MI300X", "gfx942", 304, 2.1, 5.3e12, 1307e12, 163e12),
)}
