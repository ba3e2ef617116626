"""Loading the native extension (csrc/): ahead of time as fastlora._C, else built just in time with ninja.

Loading is guarded: any failure is logged once with its reason, and the dispatcher then drops the CPP and CUDA
backends. Nothing here runs at import; the first op that could use a native kernel triggers it.

Environment:
    FASTLORA_NATIVE=0       never load or build the extension.
    FASTLORA_CACHE_DIR      where just-in-time builds go (default: $XDG_CACHE_HOME/fastlora or ~/.cache/fastlora).
    FASTLORA_CSRC_DIR       the C++/CUDA sources (default: csrc/ beside the package, in a checkout).
    FASTLORA_CPU_ISA        force a SIMD path of the C++ CPU kernels: avx512, avx2 or portable (default: the
                            widest this CPU runs, no wider than ATEN_CPU_CAPABILITY names); read at every call.
    FASTLORA_CPU_HUGEPAGES=0  never advise transparent huge pages for a fresh output (csrc/cpu/nf4.cpp says why).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import threading
from pathlib import Path

import torch

from ._logging import logger
from .device import device_info

# The registered native ops behind each dispatcher op: an op has a native kernel for a device type only when
# all of them do.
NATIVE_OPS: dict[str, tuple[str, ...]] = {
    "swiglu": ("native_swiglu_fwd", "native_swiglu_bwd"),
    "nf4_dequantize": ("native_nf4_dequantize",),
}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC will not
# if-convert the clamps of csrc/cpu's exp, so those loops stay scalar (3-5x slower).
# -fopenmp: at::parallel_for is inline OpenMP; without the flag it silently runs on one thread. Not linked: the
# GOMP symbols resolve to the libgomp torch already loaded, so the process keeps one OpenMP runtime.
CXX_FLAGS = ("-O3", "-fno-trapping-math", "-fopenmp")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": how it was loaded, or "error": why it was not


def load() -> bool:
    """Load the extension once; True when its ops are registered. Never raises."""
    with _lock:
        if not _state:
            try:
                _state["loaded"] = _load()
                logger.info("native extension: %s", _state["loaded"])
            except Exception as e:  # a compiler error, a missing header, a bad .so: all mean "no native ops"
                reason = f"{type(e).__name__}: {_first_lines(str(e))}"
                _state["error"] = reason
                logger.warning("native extension unavailable, the C++/CUDA backends are off: %s", reason)
    return "loaded" in _state


def load_error() -> str | None:
    """Why the extension is not loaded (None when it is, or when loading has not been tried)."""
    return _state.get("error")  # type: ignore[return-value]


def how_loaded() -> str | None:
    """"ahead-of-time build fastlora._C" or "just-in-time build in DIR", once loaded."""
    return _state.get("loaded")  # type: ignore[return-value]


def kernels() -> frozenset[tuple[str, str]]:
    """The ``(op, device_type)`` pairs the loaded extension serves; loads it first."""
    if not load():
        return frozenset()
    found = set()
    for op, names in NATIVE_OPS.items():
        for device_type, key in _DISPATCH_KEYS.items():
            # hasattr first: a build older than this Python code may lack an op altogether.
            if all(hasattr(torch.ops.fastlora, n)
                   and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlora::{n}", key) for n in names):
                found.add((op, device_type))
    return frozenset(found)


def sources_dir() -> Path:
    env = os.environ.get("FASTLORA_CSRC_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "csrc"


def cache_dir() -> Path:
    env = os.environ.get("FASTLORA_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastlora"


def source_files(with_cuda: bool) -> list[Path]:
    root = sources_dir()
    files = sorted((root / "cpu").glob("*.cpp"))
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return files


def _load() -> str:
    if os.environ.get("FASTLORA_NATIVE", "1") == "0":
        raise RuntimeError("disabled by FASTLORA_NATIVE=0")
    try:
        importlib.import_module("fastlora._C")
        return "ahead-of-time build fastlora._C"
    except ModuleNotFoundError:
        return _build_jit()
    except ImportError as e:  # built against another torch: the sources may still build
        logger.warning("fastlora._C does not load (%s); building the extension just in time instead", e)
        return _build_jit()


def _build_jit() -> str:
    from torch.utils import cpp_extension

    # The CUDA kernels need nvcc; without a toolkit the C++ kernels still build.
    with_cuda = torch.version.cuda is not None and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    if torch.version.cuda is not None and torch.cuda.is_available() and not with_cuda:
        logger.info("no CUDA toolkit found (CUDA_HOME): building the C++ kernels only")
    files = source_files(with_cuda)
    if not files:
        raise FileNotFoundError(f"no C++ sources under {sources_dir()} (install from a checkout, or build ahead "
                                "of time with FASTLORA_BUILD_EXT=1)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH)")

    cpp_extension.verify_ninja_availability()
    # The build directory is named after the sources and the torch build, so an edit or a torch upgrade
    # rebuilds instead of loading a stale library.
    # -march=native: the build is for this machine only, so its vector width is fair game (and part of the key).
    cpu = device_info("cpu")
    key = f"{torch.__version__}|{torch.version.cuda}|{cpu.name}|{sorted(cpu.cpu_features)}|{CXX_FLAGS}"
    digest = hashlib.sha256(key.encode())
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    name = f"fastlora_native_{digest.hexdigest()[:16]}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{name}.so").exists():  # else ninja finds it up to date and only loads it
        # A WARNING, not INFO: the first use stalls for a while, and a silent stall looks like a hang.
        logger.warning("building fastlora's native kernels, once for these sources and this torch (~10-30 s), "
                       "in %s", build_dir)
    cpp_extension.load(
        name=name, sources=[str(f) for f in files], build_directory=str(build_dir),
        extra_cflags=[*CXX_FLAGS, "-march=native"], extra_cuda_cflags=["-O3"], is_python_module=False, verbose=False,
    )
    return f"just-in-time build in {build_dir}"


def _first_lines(text: str, n: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[:n]) + (" | ..." if len(lines) > n else "")
