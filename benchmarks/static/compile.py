"""Compile a Triton kernel as its launcher calls it, for a GPU target, on a machine without that GPU.

The launcher runs with CPU tensors; its ``kernel[grid](...)`` is caught (nothing runs) and compiled with the argument
specialisation Triton's JIT would give it on a GPU (16-byte aligned pointers, integers divisible by 16), keeping the
grid so that waves can be counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
          torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")
# Constexprs a launcher sets from the device it sees (CPU here), with the value it gives on a GPU.
ON_GPU = {"DOT_FP32": False}


def targets() -> dict[str, object]:
    """The GPU targets, by short name (``sm90`` is compiled as sm_90a, as Triton does for an H100; ``gfx942`` is the
    MI300X)."""
    from triton.backends.compiler import GPUTarget

    return {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32), "sm75": GPUTarget("cuda", 75, 32),
            "gfx942": GPUTarget("hip", "gfx942", 64)}


@dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` a launcher made."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def values(self) -> dict[str, object]:
        """Every argument by name, defaults included (what a grid function and the analysis read)."""
        fn = self.kernel
        values = {p.name: p.default for p in fn.params}
        values.update(dict(zip(fn.arg_names, self.args, strict=False)))
        values.update({k: v for k, v in self.kwargs.items() if k in fn.arg_names})
        return values


def capture(launcher: Callable[[], None]) -> list[Launch]:
    """The kernel launches ``launcher()`` makes, caught instead of run."""
    from triton.runtime.jit import KernelInterface

    launches: list[Launch] = []

    def getitem(self: KernelInterface, grid: object) -> Callable:
        def launch(*args: object, **kwargs: object) -> None:
            record = Launch(self, (), args, kwargs)
            g = grid(record.values()) if callable(grid) else grid
            record.grid = tuple(int(d) for d in (g if isinstance(g, tuple | list) else (g,)))
            launches.append(record)
        return launch

    saved = KernelInterface.__getitem__
    KernelInterface.__getitem__ = getitem
    try:
        launcher()
    finally:
        KernelInterface.__getitem__ = saved
    return launches


def source(launch: Launch) -> tuple[object, dict]:
    """The ``ASTSource`` and compile options of a launch, specialised as Triton's JIT would on a GPU."""
    from triton.compiler import ASTSource

    values = launch.values()
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(launch.kernel.params):
        v = ON_GPU.get(p.name, values[p.name])
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        if isinstance(v, torch.Tensor):
            signature[p.name], aligned = "*" + _TYPES[v.dtype], v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            signature[p.name], aligned = "i1", False
        elif isinstance(v, int):
            signature[p.name], aligned = ("i32" if -2**31 <= v < 2**31 else "i64"), v % 16 == 0
        elif isinstance(v, float):
            signature[p.name], aligned = "fp32", False
        else:
            raise TypeError(f"{launch.name}: argument {p.name} of type {type(v).__name__}")
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in launch.kwargs.items() if k in _OPTIONS}
    return ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs), options


def compile_launch(launch: Launch, target: str) -> object:
    """Triton's compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``) of a launch for ``target``."""
    import triton

    src, options = source(launch)
    return triton.compile(src, target=targets()[target], options=options)


def root_cause(e: BaseException) -> str:
    """The innermost exception's message: a CompilationError wraps its cause in the source excerpts."""
    messages = []
    while e is not None:
        messages.append(f"{type(e).__name__}: {str(e)[-1500:]}")
        e = e.__cause__ or e.__context__
    return "\n...\n".join(messages[-2:])
