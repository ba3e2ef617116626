"""What the machine can do: one cached probe per device, taken at first use and never at import."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import os
import platform
from dataclasses import dataclass, field

import torch

from ._logging import logger

_PACKAGES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "fastlora")
# AMD parts with bf16 matrix cores: CDNA2 (gfx90a), CDNA3 (gfx94x, gfx95x), RDNA3+ (gfx11xx, gfx12xx).
_AMD_BF16_PREFIXES = ("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")


@dataclass(frozen=True)
class DeviceInfo:
    """A snapshot of one device and the software around it.

    ``free_memory`` is read when the probe runs; everything else is static. Build one by hand to ask the
    dispatcher what it would do on another machine (the dispatcher tests simulate an H100, a T4, an MI300X...).

    Example:
        >>> info = fastlora.device_info()            # the default device: CUDA if present, else CPU
        >>> info.vendor, info.compute_dtype
        ('cpu', torch.float32)
    """

    vendor: str  # "nvidia", "amd", "intel", "apple" or "cpu"
    device_type: str  # torch's device type: "cuda" (also ROCm), "xpu", "mps" or "cpu"
    index: int | None
    name: str
    capability: tuple[int, int] | None = None  # CUDA compute capability; ROCm reports one too
    arch: str | None = None  # "sm_90", "gfx942", or the CPU's instruction set ("AVX512")
    total_memory: int | None = None  # bytes
    free_memory: int | None = None  # bytes, when probed
    bf16: bool = False  # computes bf16 natively (on a CPU: AVX512-BF16 or AMX), so bf16 is a fast choice
    tf32: bool = False
    compute_dtype: torch.dtype = torch.float32  # the default compute dtype: bf16/fp16 on GPUs, fp32 on every CPU
    triton_importable: bool = False
    triton_usable: bool = False
    triton_reason: str = ""
    versions: dict[str, str | None] = field(default_factory=dict, hash=False, compare=False)
    cpu_features: frozenset[str] = frozenset()

    @property
    def is_gpu(self) -> bool:
        return self.device_type != "cpu"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device_type, self.index) if self.index is not None else torch.device("cpu")

    def replace(self, **changes: object) -> DeviceInfo:
        """A copy with some fields changed (handy for simulating another machine)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
        d["cpu_features"] = sorted(self.cpu_features)
        d["capability"] = list(self.capability) if self.capability else None
        return d


def device_info(device: torch.device | str | int | None = None) -> DeviceInfo:
    """Probe ``device`` (default: the current CUDA/ROCm device if there is one, else the CPU), once.

    Args:
        device: a torch.device, a string such as ``"cuda:1"``, a CUDA index, or None.

    Returns:
        The cached :class:`DeviceInfo` for that device.

    Example:
        >>> fastlora.device_info("cpu").cpu_features
        frozenset({'avx2', 'avx512f', ...})
    """
    return _probe(_normalize(device))


def _normalize(device: torch.device | str | int | None) -> str:
    if device is None:
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int):
        return f"cuda:{device}"
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    if dev.index is None:
        module = getattr(torch, dev.type, None)
        index = module.current_device() if module is not None and hasattr(module, "current_device") else 0
        return f"{dev.type}:{index}"
    return str(dev)


@functools.cache
def _probe(device: str) -> DeviceInfo:
    dev = torch.device(device)
    versions = package_versions()
    if dev.type == "cuda":
        info = _probe_cuda(dev, versions)
    elif dev.type == "xpu":
        info = _probe_generic(dev, "intel", torch.xpu.get_device_name(dev.index), versions, bf16=True)
    elif dev.type == "mps":
        info = _probe_generic(dev, "apple", "Apple MPS", versions, bf16=False)
    elif dev.type == "cpu":
        info = _probe_cpu(versions)
    else:
        raise ValueError(f"device_info: unsupported device type {dev.type!r} (expected cuda, xpu, mps or cpu)")
    importable, usable, reason = _triton_status(info)
    info = info.replace(triton_importable=importable, triton_usable=usable, triton_reason=reason)
    logger.debug("probed %s: %s", device, info)
    return info


def _probe_cuda(dev: torch.device, versions: dict[str, str | None]) -> DeviceInfo:
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, _ = torch.cuda.mem_get_info(index)
    capability = (props.major, props.minor)
    if torch.version.hip:
        arch = props.gcnArchName.split(":")[0]
        bf16 = arch.startswith(_AMD_BF16_PREFIXES)
        vendor, tf32 = "amd", False
    else:
        arch = f"sm_{props.major}{props.minor}"
        bf16 = tf32 = capability >= (8, 0)
        vendor = "nvidia"
    return DeviceInfo(
        vendor=vendor, device_type="cuda", index=index, name=props.name, capability=capability, arch=arch,
        total_memory=props.total_memory, free_memory=free, bf16=bf16, tf32=tf32,
        compute_dtype=torch.bfloat16 if bf16 else torch.float16, versions=versions,
    )


def _probe_generic(dev: torch.device, vendor: str, name: str, versions: dict[str, str | None], *,
                   bf16: bool) -> DeviceInfo:
    return DeviceInfo(
        vendor=vendor, device_type=dev.type, index=dev.index if dev.index is not None else 0, name=name,
        bf16=bf16, compute_dtype=torch.bfloat16 if bf16 else torch.float16, versions=versions,
    )


# x86 features as torch's cpuinfo reads them from CPUID: what this process can execute, where /proc/cpuinfo may
# describe the host instead (under an emulator such as qemu-user, which runs code for a CPU without AVX-512).
_TORCH_CPU_PROBES = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                     "avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}


def _probe_cpu(versions: dict[str, str | None]) -> DeviceInfo:
    flags = set(_cpu_flags())
    for feature, probe in _TORCH_CPU_PROBES.items():
        supported = getattr(torch.cpu, probe, None)
        if supported is not None and platform.machine() in ("x86_64", "AMD64") and not supported():
            flags.discard(feature)
    features = frozenset(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma", "neon", "asimd")
                         if f in flags)
    return DeviceInfo(
        vendor="cpu", device_type="cpu", index=None, name=_cpu_name(), arch=torch.backends.cpu.get_cpu_capability(),
        total_memory=_meminfo("MemTotal"), free_memory=_meminfo("MemAvailable"), bf16=cpu_has_bf16(features),
        compute_dtype=CPU_COMPUTE_DTYPE, versions=versions, cpu_features=features,
    )


def cpu_has_bf16(features: frozenset[str]) -> bool:
    """Whether a CPU with these features (``DeviceInfo.cpu_features``) computes bf16 natively (AVX512-BF16 or AMX
    tiles), so that bf16 is a fast choice there; it is never the default (see :data:`CPU_COMPUTE_DTYPE`).

    Example:
        >>> cpu_has_bf16(frozenset({"avx2", "avx512f", "avx512_bf16"})), cpu_has_bf16(frozenset({"avx2"}))
        (True, False)
    """
    return bool({"avx512_bf16", "amx_bf16"} & features)


#: What a CPU computes in unless the user chooses otherwise: float32 on every CPU, with or without bf16
#: instructions. bf16 is faster where the CPU has them (the demo's small model trains 1.2x faster unpatched and
#: 1.4x patched on a Sapphire Rapids Xeon with AMX), but training in it changes the numbers, and a default that
#: follows the CPU would make the same command give other losses on other machines; transformers and PEFT
#: train in fp32 on a CPU too. bf16 is the user's choice: a model loaded in it, or ``--dtype bfloat16``.
CPU_COMPUTE_DTYPE = torch.float32

#: The names ``--dtype`` options accept.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A floating-point dtype from its name (``float32``, ``fp32``, ``bfloat16``, ``bf16``, ``float16``, ``fp16``).

    Raises:
        ValueError: any other name.

    Example:
        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[key]


def _triton_status(info: DeviceInfo) -> tuple[bool, bool, str]:
    try:
        triton = importlib.import_module("triton")
    except Exception as e:  # a broken install raises more than ImportError
        return False, False, f"triton cannot be imported ({type(e).__name__}: {e})"
    if info.device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, True, "CPU through the Triton interpreter (TRITON_INTERPRET=1)"
        return True, False, "Triton has no CPU backend (TRITON_INTERPRET=1 runs kernels in the slow interpreter)"
    wanted = {"nvidia": "nvidia", "amd": "amd", "intel": "intel"}.get(info.vendor)
    try:
        backends = set(importlib.import_module("triton.backends").backends)
    except Exception as e:
        return True, False, f"triton's backends cannot be listed ({type(e).__name__}: {e})"
    if wanted is None or wanted not in backends:
        return True, False, f"triton {triton.__version__} has no backend for {info.vendor} ({sorted(backends)})"
    return True, True, f"triton {triton.__version__} with its {wanted} backend"


def package_versions() -> dict[str, str | None]:
    """Versions of the packages fastlora works with, read from their metadata without importing them."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    versions["hip"] = torch.version.hip
    return versions


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
