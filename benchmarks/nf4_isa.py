"""NF4 dequantize on the CPU, each SIMD path of the C++ kernel against bitsandbytes, interleaved.

The suite's harness times one provider after another; on a shared or throttling CPU that drifts between
providers. Here every round calls each candidate once in turn (A B C A B C ...) and the medians are over rounds,
so slow spells hit all candidates alike. Each fastlora path runs with a fresh output (as a layer's forward does)
and into a reused buffer (``*-out``), through the public API (``fastlora.dequantize_nf4(w, backend="cpp")``), with
``FASTLORA_CPU_ISA`` forcing the path; bitsandbytes has no ``out=`` kernel on the CPU, so both are compared with
its fresh output. Outputs are checked against the independent decoder before timing.

    taskset -c 1 env OMP_NUM_THREADS=1 python -m fastlora.benchmarks.nf4_isa --repeats 15
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch

import fastlora
from fastlora import NF4Weight, quantize_nf4
from fastlora.testing import decode_nf4

PATHS = ("avx512", "avx2", "portable")
SHAPES = ((1024, 1024), (4096, 4096), (4096, 14336))
DTYPES = (torch.bfloat16, torch.float32)


def path_support() -> dict[str, str]:
    """Each C++ path: "" when this CPU runs it, else why not."""
    import fastlora._native as native

    if not native.load():
        return dict.fromkeys(PATHS, f"native extension unavailable: {native.load_error()}")
    out = {}
    for path in PATHS:
        with forced(path):
            try:
                torch.ops.fastlora.native_cpu_isa()
                out[path] = ""
            except RuntimeError as e:
                out[path] = str(e).splitlines()[0]
    return out


@contextlib.contextmanager
def forced(path: str | None) -> Iterator[None]:
    """``FASTLORA_CPU_ISA=path`` inside the block (None: the automatic choice), as it was after."""
    saved = os.environ.get("FASTLORA_CPU_ISA")
    if path is None:
        os.environ.pop("FASTLORA_CPU_ISA", None)
    else:
        os.environ["FASTLORA_CPU_ISA"] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FASTLORA_CPU_ISA", None)
        else:
            os.environ["FASTLORA_CPU_ISA"] = saved


def candidates(w: NF4Weight, paths: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a call returning the dequantized weight; ``*-out`` names write into one reused buffer."""
    found: dict[str, Callable[[], torch.Tensor]] = {}
    try:
        from bitsandbytes.functional import dequantize_4bit

        p = w.to_bnb()
        found["bnb"] = lambda: dequantize_4bit(p.data, p.quant_state)  # on the CPU it has no `out=` kernel
    except ImportError:
        pass
    for path in paths:
        buf = torch.empty(w.shape, dtype=w.dtype)

        def fresh(path: str = path) -> torch.Tensor:
            with forced(path):
                return fastlora.dequantize_nf4(w, backend="cpp")

        def reused(path: str = path, buf: torch.Tensor = buf) -> torch.Tensor:
            with forced(path):
                return fastlora.dequantize_nf4(w, backend="cpp", out=buf)

        found[path], found[f"{path}-out"] = fresh, reused
    return found


def measure(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function, ``repeats`` interleaved rounds after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            if r:
                times[name].append(dt)
    return times


def summary(ms: list[float]) -> tuple[float, float, float]:
    """Median and the 20th / 80th percentiles."""
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), q[1], q[7]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args(argv)
    support = path_support()
    paths = [p for p in PATHS if not support[p]]
    print(f"torch threads {torch.get_num_threads()}; paths: "
          + ", ".join(f"{p} ({'ok' if not why else why})" for p, why in support.items()))
    with forced(None):
        print(f"automatic path: {torch.ops.fastlora.native_cpu_isa()}")
    print(f"{'shape':>11} {'dtype':>8} {'candidate':>14} {'median ms':>10} {'p20-p80 ms':>16} {'vs bnb':>7}")
    for shape_text in args.shapes.split(","):
        shape = tuple(int(s) for s in shape_text.split("x"))
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            g = torch.Generator().manual_seed(0)
            w = quantize_nf4(torch.randn(shape, generator=g).to(dtype), blocksize=64, double_quant=True)
            fns = candidates(w, paths)
            want = decode_nf4(w)
            for name, fn in fns.items():
                if not name.startswith("bnb") and not torch.equal(fn(), want):
                    raise SystemExit(f"{name} {shape_text} {dtype_name}: differs from the independent decoder")
            stats = {name: summary(ms) for name, ms in measure(fns, args.repeats).items()}
            for name, (med, p20, p80) in stats.items():
                base = stats.get("bnb")
                ratio = f"{base[0] / med:6.2f}x" if base else "      -"
                print(f"{shape_text:>11} {dtype_name:>8} {name:>14} {med:10.3f} {p20:7.3f}-{p80:<8.3f} {ratio}")


if __name__ == "__main__":
    main()
