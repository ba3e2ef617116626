"""nf4_matmul (an NF4 weight read inside the GEMM, with a low-rank epilogue) against dequantize-then-matmul."""

import pytest
import torch

import fastlora
from fastlora.ops.nf4_matmul import nf4_matmul, nf4_matmul_reference
from fastlora.testing import assert_close_to_reference, decode_nf4

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(dtype, device, *, m=5, n=70, k=96, rank=6, nested=True, blocksize=64, trans=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = fastlora.quantize_nf4(torch.randn(n, k, generator=g).to(device, dtype), blocksize=blocksize,
                              double_quant=nested)
    p, q = (k, n) if trans else (n, k)
    x = torch.randn(m, q, generator=g).to(device, dtype)
    e1, e2 = torch.randn(m, rank, generator=g).to(device, dtype), torch.randn(p, rank, generator=g).to(device, dtype)
    bias = torch.randn(p, generator=g).to(device, dtype)
    return w, x, e1, e2, bias


def _compare(backend, device, dtype, **shape):
    trans = shape.get("trans", False)
    w, x, e1, e2, bias = _case(dtype, device, **shape)
    with_bias = None if trans else bias
    got = nf4_matmul(x, w, trans=trans, e1=e1, e2=e2, bias=with_bias, backend=backend)
    dense = decode_nf4(w, dtype=dtype)  # the independent decoder's weight
    ref = nf4_matmul_reference(x.double(), dense.double(), trans, e1.double(), e2.double(),
                               None if with_bias is None else with_bias.double())
    lowp = nf4_matmul_reference(x, dense, trans, e1, e2, with_bias)
    assert got.dtype == dtype
    # The interpreter truncates bf16 stores: one more ulp there.
    assert_close_to_reference(got, ref, lowp, ulps=2, name=f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_dequantize_then_matmul(dtype, nested, trans, triton_device):
    _compare("triton", triton_device, dtype, nested=nested, trans=trans)


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_row_runs_of_whole_blocks(dtype, nested, trans, triton_device):
    """K a multiple of the block, the block of the 64-wide tile: each row's bytes are loaded as one run."""
    _compare("triton", triton_device, dtype, n=70, k=128, nested=nested, trans=trans)
    _compare("triton", triton_device, dtype, m=17, n=33, k=256, blocksize=128, nested=nested, trans=trans)


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_split_reduction(dtype, trans, triton_device, monkeypatch):
    """A narrow output's reduction split into slices of 64 (the last one short, and with the odd-layout path too):
    the epilogue (LoRA, bias) counted once, the fp32 slices added before the one rounding."""
    from fastlora.kernels import nf4_matmul as kernels

    monkeypatch.setattr(kernels, "split_q", lambda ctas, q, resident: 64)
    _compare("triton", triton_device, dtype, m=5, n=70, k=256, trans=trans)  # 4 slices (or 2 transposed)
    _compare("triton", triton_device, dtype, m=3, n=40, k=96, trans=trans)  # K not a whole tile: element-wise path


def test_split_fills_the_gpu_with_whole_slices():
    from fastlora.kernels.nf4_matmul import split_q

    assert split_q(64, 4096, 0) == 4096  # no SM count (a CPU): no split
    assert split_q(896, 4096, 132 * 7) == 4096  # 224 x 4 tiles already fill 132 SMs x 7
    for tiles, q, resident in ((64, 4096, 132 * 7), (224, 4096, 132 * 7), (64, 14336, 132 * 4)):  # 8B shapes
        piece = split_q(tiles, q, resident)
        ctas = tiles * -(-q // piece)
        shorter = tiles * -(-q // (piece - 64))  # one trip of the K loop less per slice
        assert piece % 64 == 0 and piece >= 256 and ctas <= resident < shorter, (tiles, q, piece)
    assert split_q(16, 300, 132 * 7) == 300  # too short to split


@pytest.mark.parametrize("shape", [dict(m=1, n=33, k=50, rank=1, blocksize=128),  # K not a multiple of the block
                                   dict(m=17, n=64, k=64, rank=20, blocksize=32),  # two row tiles, two rank tiles
                                   dict(m=3, n=5, k=7, rank=2, trans=True)])  # odd element count
def test_triton_odd_shapes(shape, triton_device):
    _compare("triton", triton_device, torch.float32, **shape)


def test_torch_backend():
    _compare("torch", torch.device("cpu"), torch.float32)
    _compare("torch", torch.device("cpu"), torch.bfloat16, trans=True)


def test_without_epilogue(triton_device):
    w, x, *_ = _case(torch.float32, triton_device)
    dense = decode_nf4(w)
    assert_close_to_reference(nf4_matmul(x, w, backend="triton"), x.double() @ dense.double().t(), x @ dense.t(),
                              name="no epilogue")


@pytest.mark.gpu
def test_large_weight_needs_int64_offsets():
    # 14336 x 4096 x 2 > 2**31 / 2: element indices pass int32 when a tile's rows are far down the weight.
    w = fastlora.quantize_nf4(torch.randn(40000, 28000, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(4, 28000, device="cuda", dtype=torch.bfloat16)
    dense = fastlora.dequantize_nf4(w)
    got = nf4_matmul(x, w, backend="triton")
    assert_close_to_reference(got, x.double() @ dense.double().t(), x @ dense.t(), ulps=2)


def test_bad_input_names_the_argument():
    w, x, e1, e2, _ = _case(torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="x must be \\[M, 96\\]"):
        nf4_matmul(x[:, :5], w)
    with pytest.raises(ValueError, match="e1 and e2 must be given together"):
        nf4_matmul(x, w, e1=e1)
    with pytest.raises(ValueError, match="bias must be \\[70\\]"):
        nf4_matmul(x, w, bias=torch.zeros(3))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    w, x, e1, e2, bias = _case(torch.float32, device)
    args = (w.data, w.absmax, w.absmax_code, w.absmax2, w.offset, w.blocksize, 70, 96)
    torch.library.opcheck(torch.ops.fastlora.nf4_matmul.default, (x, *args, False, e1, e2, bias, backend))
    torch.library.opcheck(torch.ops.fastlora.nf4_matmul.default, (x, *args, False, None, None, None, backend))
