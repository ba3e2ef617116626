"""Reading a compiled kernel: ``ptxas -v``'s resource use, and the SASS (``cuobjdump -sass``) as instructions, loops,
global access widths and tensor-core instructions. Both tools ship with Triton's NVIDIA backend."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
# Tensor-core instructions: HGMMA is sm_90's warpgroup MMA (wgmma), HMMA the warp-level mma.sync of sm_75+.
TENSOR_CORE = ("HGMMA", "HMMA", "IMMA", "QGMMA")


@dataclass
class Resources:
    """What ``ptxas -v`` reports for the kernel."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack: int


@dataclass
class Instruction:
    address: int
    opcode: str  # with modifiers: LDG.E.128, HGMMA.64x64x16.F32.BF16, ...
    operands: str
    predicated: bool

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class Sass:
    """A kernel's SASS, up to its last EXIT (the padding after it is not code)."""

    instructions: list[Instruction] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Sass:
        instructions = []
        for line in text.splitlines():
            m = _LINE.match(line)
            if m:
                instructions.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip(),
                                                m.group(2) is not None))
        last_exit = max((i for i, ins in enumerate(instructions) if ins.base == "EXIT"), default=len(instructions) - 1)
        return cls(instructions[:last_exit + 1])

    def counts(self, instructions: list[Instruction] | None = None) -> Counter:
        """Instructions by base opcode (NOPs left out)."""
        return Counter(i.base for i in (self.instructions if instructions is None else instructions)
                       if i.base != "NOP")

    def loops(self) -> list[list[Instruction]]:
        """The bodies of the loops (a branch back to an earlier address), innermost and longest first."""
        by_address = {ins.address: k for k, ins in enumerate(self.instructions)}
        bodies = []
        for k, ins in enumerate(self.instructions):
            if ins.base != "BRA":
                continue
            m = re.match(r"`?\(?\.?L?_?x?_?\d*\)?\s*0x([0-9a-f]+)", ins.operands) or \
                re.search(r"0x([0-9a-f]+)", ins.operands)
            if m is None:
                continue
            target = int(m.group(1), 16)
            if target < ins.address and target in by_address and by_address[target] < k:
                bodies.append(self.instructions[by_address[target]:k + 1])
        return sorted(bodies, key=len, reverse=True)

    def main_loop(self) -> list[Instruction]:
        """The longest loop body (the K loop of a GEMM, the vocabulary loop of the cross-entropy), or nothing."""
        loops = [body for body in self.loops() if len(body) > 2]  # a 1-instruction self-branch is the trap at the end
        return loops[0] if loops else []

    def global_widths(self) -> dict[str, Counter]:
        """Global loads and stores by width in bits: {"load": {32: 3, 128: 2}, "store": {...}}. LDGSTS (the
        asynchronous copy to shared memory of pipelined loops) counts as a load."""
        widths = {"load": Counter(), "store": Counter()}
        for ins in self.instructions:
            if ins.base in ("LDG", "LDGSTS", "STG"):
                parts = ins.opcode.split(".")
                bits = next((int(p) for p in parts if p in ("64", "128")), None)
                if bits is None:
                    bits = 16 if any(p in ("U16", "S16") for p in parts) else \
                        8 if any(p in ("U8", "S8") for p in parts) else 32
                widths["store" if ins.base == "STG" else "load"][bits] += 1
        return widths

    def tensor_core(self) -> Counter:
        return Counter(i.opcode.split(".")[0] for i in self.instructions if i.base in TENSOR_CORE)


def _bin(name: str) -> str:
    from triton.backends.nvidia import compiler

    if name == "ptxas":
        raise ValueError("use ptxas_for(arch)")
    return str(Path(compiler.__file__).parent / "bin" / name)


def ptxas_for(arch: int) -> str:
    """The ptxas Triton itself uses for this compute capability (a newer one from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def resources(ptx: str, capability: int) -> Resources:
    """Registers, spills and stack of the kernel in ``ptx``, from ``ptxas -v`` for the PTX's own target."""
    arch = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas_for(capability), f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True, check=True)
    info = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    stack = re.search(r"(\d+) bytes stack frame", info)
    return Resources(int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), int(stack.group(1)))


def disassemble(cubin: bytes) -> Sass:
    """The SASS of a cubin, parsed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([_bin("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True)
    return Sass.parse(done.stdout)
