"""The C++ NF4 dequantize's SIMD paths (csrc/cpu/nf4.cpp), each forced in turn with FASTLORA_CPU_ISA: against the
independent decoder, and bit for bit (NaN signs and payloads included) against the portable path."""

import os
import subprocess
import sys

import pytest
import torch

import fastlora
from fastlora.testing import decode_nf4, decode_nf4_bytes

PATHS = ["avx512", "avx2", "portable"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64}
# Element counts around the vector widths (16 and 32 outputs) and a weight's ragged last block; blocksizes from
# the smallest the kernel takes to bitsandbytes' largest, and ones that are not multiples of the vector width.
NUMELS = [1, 2, 15, 16, 17, 33, 63, 65, 1001, 4097]
BLOCKSIZES = [2, 6, 30, 32, 64, 96, 128, 4096]


@pytest.fixture(autouse=True, scope="module")
def native() -> None:
    if ("nf4_dequantize", "cpu") not in fastlora.dispatch._native_kernels():
        pytest.skip(f"native extension unavailable: {fastlora._native.load_error()}")


def _force(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """FASTLORA_CPU_ISA=path, or a skip saying why this CPU cannot run it."""
    monkeypatch.setenv("FASTLORA_CPU_ISA", path)
    try:
        assert torch.ops.fastlora.native_cpu_isa() == path
    except RuntimeError as e:
        pytest.skip(str(e).strip().splitlines()[0])


def _cases():
    """(data, absmax, nested tensors, blocksize, numel): random bytes and scales, plain and double-quantized,
    and scales that are inf, NaN, subnormal, ties, or round to inf or a subnormal in fp16."""
    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e-40, -1e-42, 3.4e38, 6.56e4, 1e-6,
                             0.0, -0.0, 2.0**-126, 3.0])
    # Signalling and negative NaNs; scales exactly halfway between two bf16 (0x3F808000, 0x3F818000) or two
    # fp16 values (0x3F801000, 0x3F803000), with an even and an odd neighbour: round to nearest even.
    bits = [0x7F800001, -0x3FFFFF, 0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000]
    specials = torch.cat([specials, torch.tensor(bits, dtype=torch.int32).view(torch.float32)])
    for numel in NUMELS:
        for bs in BLOCKSIZES:
            blocks = -(-numel // bs)
            data = torch.randint(0, 256, ((numel + 1) // 2,), generator=g, dtype=torch.uint8)
            yield data, torch.rand(blocks, generator=g) * 5, {}, bs, numel
            yield data, specials[torch.randint(0, len(specials), (blocks,), generator=g)], {}, bs, numel
            nested = dict(absmax_code=torch.randn(256, generator=g), absmax2=torch.rand(-(-blocks // 256),
                          generator=g), offset=torch.tensor(0.37))
            yield data, torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8), nested, bs, numel


def _dequantize(data, absmax, nested, bs, numel, dtype, out=None):
    out = torch.full((numel,), float("nan"), dtype=dtype) if out is None else out
    torch.ops.fastlora.native_nf4_dequantize(data, absmax, nested.get("absmax_code"), nested.get("absmax2"),
                                             nested.get("offset"), bs, numel, out)
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, with NaN where the other has NaN (the oracle's NaN signs follow torch's kernels, not C++'s)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0, 1, -1), b.nan_to_num(0, 1, -1))


@pytest.fixture(scope="module")
def portable() -> dict:
    """The portable path's output of every case (the bit pattern the SIMD paths must reproduce)."""
    saved = os.environ.get("FASTLORA_CPU_ISA")
    os.environ["FASTLORA_CPU_ISA"] = "portable"
    try:
        return {(i, dtype): _dequantize(*case, dtype) for i, case in enumerate(_cases()) for dtype in DTYPES}
    finally:
        os.environ.pop("FASTLORA_CPU_ISA") if saved is None else os.environ.update(FASTLORA_CPU_ISA=saved)


@pytest.mark.parametrize("path", PATHS)
def test_path_matches_decoder_and_portable_bits(path, portable, monkeypatch):
    _force(monkeypatch, path)
    for i, (data, absmax, nested, bs, numel) in enumerate(_cases()):
        for dtype in DTYPES:
            got = _dequantize(data, absmax, nested, bs, numel, dtype)
            where = f"{path} case {i}: numel={numel} blocksize={bs} nested={bool(nested)} {dtype}"
            assert _same_bits(got, portable[i, dtype]), where
            want = decode_nf4_bytes(data, absmax, (numel,), dtype, bs, **nested)
            assert _same_values(got, want), where


@pytest.mark.parametrize("path", PATHS)
def test_path_on_quantized_weights_unaligned_and_reused(path, monkeypatch):
    """Real weights through the public API, into a buffer at an odd address that already holds data, and a fresh
    output large enough for the huge-page advice (with the advice off too)."""
    _force(monkeypatch, path)
    g = torch.Generator().manual_seed(1)
    for shape, dtype in (((40, 96), torch.bfloat16), ((33, 129), torch.float16), ((1536, 1024), torch.float32)):
        w = fastlora.quantize_nf4(torch.randn(shape, generator=g).to(dtype), blocksize=64, double_quant=True)
        want = decode_nf4(w)
        assert torch.equal(fastlora.dequantize_nf4(w, backend="cpp"), want)
        monkeypatch.setenv("FASTLORA_CPU_HUGEPAGES", "0")
        assert torch.equal(fastlora.dequantize_nf4(w, backend="cpp"), want)
        monkeypatch.delenv("FASTLORA_CPU_HUGEPAGES")
        store = torch.zeros(w.numel + 1, dtype=dtype)
        out = store[1:].view(shape)  # 2 or 4 bytes past an aligned start
        assert torch.equal(fastlora.dequantize_nf4(w, backend="cpp", out=out), want)
        assert store[0] == 0
        data = torch.cat([torch.zeros(1, dtype=torch.uint8), w.data.reshape(-1)])[1:]  # codes at an odd address
        flat = _dequantize(data, w.absmax, dict(absmax_code=w.absmax_code, absmax2=w.absmax2, offset=w.offset),
                           w.blocksize, w.numel, dtype)
        assert torch.equal(flat.view(shape), want)


def test_unknown_or_unsupported_path_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTLORA_CPU_ISA", "avx3")
    with pytest.raises(RuntimeError, match="FASTLORA_CPU_ISA=avx3 is not one of"):
        torch.ops.fastlora.native_cpu_isa()
    w = fastlora.quantize_nf4(torch.randn(4, 64))
    with pytest.raises(RuntimeError, match="FASTLORA_CPU_ISA=avx3"):
        fastlora.dequantize_nf4(w, backend="cpp")


def test_automatic_path_is_the_widest_and_follows_aten_cpu_capability(monkeypatch):
    monkeypatch.delenv("FASTLORA_CPU_ISA", raising=False)
    supported = []
    for path in PATHS:
        monkeypatch.setenv("FASTLORA_CPU_ISA", path)
        try:
            supported.append(torch.ops.fastlora.native_cpu_isa())
        except RuntimeError:
            pass
    monkeypatch.delenv("FASTLORA_CPU_ISA")
    assert supported[-1] == "portable"
    widest = supported[0]
    aten = os.environ.get("ATEN_CPU_CAPABILITY")
    expected = {"default": "portable", "avx2": "avx2" if "avx2" in supported else widest}.get(aten, widest)
    assert torch.ops.fastlora.native_cpu_isa() == expected
    # A fresh interpreter reads ATEN_CPU_CAPABILITY once; `default` means the portable path.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    code = "import fastlora._native, torch; fastlora._native.load(); print(torch.ops.fastlora.native_cpu_isa())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "portable"


def test_env_names_the_path(monkeypatch):
    from fastlora.env import collect, format_report

    monkeypatch.setenv("FASTLORA_CPU_ISA", "portable")
    report = collect("cpu")
    assert report["native"]["cpu_isa"] == "portable"
    assert "CPU SIMD path  portable" in format_report(report)
