"""NF4: the format against bitsandbytes (the oracle), every dequantization backend, and bad input."""

import pytest
import torch

import fastlora
from fastlora.ops.nf4 import nf4_dequantize_reference
from fastlora.ops.nf4_weight import NF4Weight, dynamic_map

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd element counts, rows not a multiple of the blocksize (blocks cross rows), one element, a 1-D weight.
SHAPES = [(5, 70), (33, 129), (7,), (1, 1), (64, 64)]
BLOCKSIZES = [32, 64, 128, 4096]


def _bnb_quantize(w, blocksize, nested):
    q, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    return q, state


def _weight(shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _from_state(q, state):
    return NF4Weight.from_bnb(bnb.nn.Params4bit(q, quant_state=state, bnb_quantized=True, quant_type="nf4",
                                                blocksize=state.blocksize, compress_statistics=state.nested))


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), BF.create_dynamic_map())


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_writes_bitsandbytes_bytes(dtype, blocksize, nested):
    for shape in SHAPES + [(300, 257)]:
        w = _weight(shape, dtype, seed=blocksize, scale=3.0)
        q, state = _bnb_quantize(w, blocksize, nested)
        ours = fastlora.quantize_nf4(w, blocksize=blocksize, double_quant=nested)
        assert ours.shape == state.shape and ours.dtype == state.dtype == dtype
        assert torch.equal(ours.data, q.view(-1)), f"{shape}: packed nibbles differ"
        if not nested:
            assert torch.equal(ours.absmax, state.absmax)
            continue
        assert torch.equal(ours.absmax2, state.state2.absmax)
        assert torch.equal(ours.offset, state.offset)
        assert torch.equal(ours.absmax_code, state.state2.code)


def test_nested_absmax_codes_are_nearest():
    """bitsandbytes' CPU quantizer of the second level searches approximately: near a midpoint between two codes
    it sometimes takes the farther one. fastlora takes the nearest, so its codes are never worse, and they agree
    everywhere else."""
    differ = total = 0
    code = dynamic_map()
    for seed in range(8):
        w = _weight((512, 512), torch.float32, seed=seed, scale=seed + 1)
        q, state = _bnb_quantize(w, 32, True)
        ours = fastlora.quantize_nf4(w, blocksize=32, double_quant=True)
        first_level = _bnb_quantize(w, 32, False)[1].absmax
        blocks = torch.nn.functional.pad(first_level - ours.offset, (0, -first_level.numel() % 256)).view(-1, 256)
        target = (blocks / ours.absmax2[:, None]).reshape(-1)[: first_level.numel()]
        err_ours = (code[ours.absmax.long()] - target).abs()
        err_bnb = (code[state.absmax.long()] - target).abs()
        assert (err_ours <= err_bnb).all()
        differ += int((ours.absmax != state.absmax).sum())
        total += ours.absmax.numel()
    assert differ / total < 0.01, f"{differ} of {total} absmax codes differ"


def _dequant_cases():
    for shape in SHAPES:
        for blocksize in (32, 64, 4096):
            for nested in (False, True):
                for dtype in DTYPES:
                    yield shape, blocksize, nested, dtype


def _check_backend(backend, device):
    for shape, blocksize, nested, dtype in _dequant_cases():
        w = _weight(shape, dtype, seed=len(shape) + blocksize, scale=2.0)
        q, state = _bnb_quantize(w, blocksize, nested)
        expected = BF.dequantize_4bit(q, state).reshape(shape).to(device)
        nf4 = _from_state(q, state).to(device)
        got = fastlora.dequantize_nf4(nf4, backend=backend)
        assert got.shape == torch.Size(shape) and got.dtype == dtype
        where = f"{backend} {shape} blocksize={blocksize} nested={nested} {dtype}"
        if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu":
            # The Triton interpreter truncates fp32 -> bf16 stores instead of rounding: 1 ulp apart at most.
            ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs()
            assert ((got.float() - expected.float()).abs() <= ulp).all(), where
        else:
            assert torch.equal(got, expected), where


def test_torch_reference_is_bit_exact():
    _check_backend("torch", torch.device("cpu"))


def test_cpp_is_bit_exact():
    if ("nf4_dequantize", "cpu") not in fastlora.dispatch._native_kernels():
        pytest.skip(f"native extension unavailable: {fastlora._native.load_error()}")
    _check_backend("cpp", torch.device("cpu"))


def test_triton_is_bit_exact(triton_device):
    _check_backend("triton", triton_device)


def _device_for(backend, device):
    """Where ``backend`` runs in this test session, or a skip."""
    if backend == "cpp":
        if ("nf4_dequantize", "cpu") not in fastlora.dispatch._native_kernels():
            pytest.skip(f"native extension unavailable: {fastlora._native.load_error()}")
        return torch.device("cpu")
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    return device


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_out_buffer_is_written_and_returned(backend, device):
    device = _device_for(backend, device)
    w = fastlora.quantize_nf4(_weight((37, 96), torch.float32, seed=3).to(device), blocksize=64)
    out = torch.full((37, 96), float("nan"), device=device)
    assert fastlora.dequantize_nf4(w, out=out, backend=backend) is out
    assert torch.equal(out, fastlora.dequantize_nf4(w, backend="torch"))


def test_dtype_override():
    w = fastlora.quantize_nf4(_weight((8, 64), torch.bfloat16))
    full = fastlora.dequantize_nf4(w, dtype=torch.float32)
    assert full.dtype == torch.float32
    assert torch.equal(full.to(torch.bfloat16), fastlora.dequantize_nf4(w))


def test_from_bnb_is_zero_copy_and_round_trips():
    layer = bnb.nn.Linear4bit(96, 40, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    w = NF4Weight.from_bnb(layer)
    assert w.data.data_ptr() == layer.weight.data.data_ptr()
    assert w.absmax.data_ptr() == layer.weight.quant_state.absmax.data_ptr()
    assert w.shape == (40, 96) and w.nested
    param = w.to_bnb()
    assert param.data.data_ptr() == w.data.data_ptr()
    again = NF4Weight.from_bnb(param)
    assert all(torch.equal(getattr(again, f), getattr(w, f)) for f in ("data", "absmax", "absmax2", "offset"))
    assert torch.equal(BF.dequantize_4bit(param.data, param.quant_state), fastlora.dequantize_nf4(w))


def test_linear4bit_holding_our_weight():
    torch.manual_seed(0)
    dense = torch.randn(40, 96)
    layer = bnb.nn.Linear4bit(96, 40, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    layer.train()  # eval mode on an AVX512-BF16 CPU would repack the weight into another layout
    w = fastlora.quantize_nf4(dense, blocksize=64)
    layer.weight = w.to_bnb()
    x = torch.randn(3, 96)
    expected = torch.nn.functional.linear(x, fastlora.dequantize_nf4(w), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_from_bnb_reads_non_uint8_storage():
    w = _weight((16, 64), torch.bfloat16)
    q, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                quant_storage=torch.bfloat16)
    assert q.dtype == torch.bfloat16
    param = bnb.nn.Params4bit(q, quant_state=state, bnb_quantized=True, quant_type="nf4", blocksize=64,
                              quant_storage=torch.bfloat16)
    nf4 = NF4Weight.from_bnb(param)
    assert nf4.data.data_ptr() == q.data_ptr()
    assert torch.equal(fastlora.dequantize_nf4(nf4), BF.dequantize_4bit(q, state))


def test_from_bnb_refuses_what_it_cannot_read():
    w = _weight((16, 64), torch.float32)
    q, state = BF.quantize_4bit(w, blocksize=64, quant_type="fp4")
    fp4 = bnb.nn.Params4bit(q, quant_state=state, bnb_quantized=True, quant_type="fp4", blocksize=64)
    with pytest.raises(ValueError, match="quant_type is 'fp4'"):
        NF4Weight.from_bnb(fp4)
    q, state = _bnb_quantize(w, 64, True)
    state.packing_format_for_cpu = True
    repacked = bnb.nn.Params4bit(q, quant_state=state, bnb_quantized=True, quant_type="nf4", blocksize=64)
    with pytest.raises(ValueError, match="repacked by bitsandbytes for CPU inference"):
        NF4Weight.from_bnb(repacked)
    with pytest.raises(TypeError, match="expected a quantized bitsandbytes Params4bit"):
        NF4Weight.from_bnb(torch.nn.Linear(4, 4))


def test_bad_input_names_the_argument():
    w = _weight((8, 64), torch.float32)
    with pytest.raises(ValueError, match="quantize_nf4: blocksize 48 is not one bitsandbytes allows"):
        fastlora.quantize_nf4(w, blocksize=48)
    with pytest.raises(TypeError, match="quantize_nf4: weight has dtype torch.int64"):
        fastlora.quantize_nf4(torch.ones(8, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="quantize_nf4: weight is empty"):
        fastlora.quantize_nf4(torch.ones(0, 64))
    nf4 = fastlora.quantize_nf4(w)
    with pytest.raises(ValueError, match="NF4Weight: data has 256 bytes, a weight of shape \\(8, 65\\) needs 260"):
        NF4Weight(nf4.data, nf4.absmax, (8, 65), nf4.dtype, 64, nf4.absmax_code, nf4.absmax2, nf4.offset)
    with pytest.raises(ValueError, match="NF4Weight: blocksize 100"):
        NF4Weight(nf4.data, nf4.absmax, nf4.shape, nf4.dtype, 100, nf4.absmax_code, nf4.absmax2, nf4.offset)
    with pytest.raises(ValueError, match="must be given together"):
        NF4Weight(nf4.data, nf4.absmax, nf4.shape, nf4.dtype, 64, nf4.absmax_code, None, nf4.offset)
    with pytest.raises(TypeError, match="NF4Weight: data must be a uint8 tensor"):
        NF4Weight(nf4.data.float(), nf4.absmax, nf4.shape, nf4.dtype, 64, nf4.absmax_code, nf4.absmax2, nf4.offset)
    with pytest.raises(TypeError, match="dequantize_nf4: w must be an NF4Weight"):
        fastlora.dequantize_nf4(w)
    with pytest.raises(TypeError, match="dequantize_nf4: dtype must be"):
        fastlora.dequantize_nf4(nf4, dtype=torch.float64)
    with pytest.raises(ValueError, match="dequantize_nf4: out must be a contiguous torch.float32 tensor of shape"):
        fastlora.dequantize_nf4(nf4, out=torch.empty(64, 8))
    with pytest.raises(ValueError, match="not contiguous"):
        fastlora.dequantize_nf4(nf4, out=torch.empty(64, 8).t())


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_opcheck(backend, device):
    device = _device_for(backend, device)
    for nested in (False, True):
        w = fastlora.quantize_nf4(_weight((9, 70), torch.float32).to(device), blocksize=32, double_quant=nested)
        args = (w.data, w.absmax, w.absmax_code, w.absmax2, w.offset, w.blocksize, w.numel)
        torch.library.opcheck(torch.ops.fastlora.nf4_dequantize.default, (*args, torch.float16, backend))
        out = torch.empty(w.numel, device=device)
        torch.library.opcheck(torch.ops.fastlora.nf4_dequantize_out.default, (*args, out, backend))


def test_opcheck_native_op():
    if ("nf4_dequantize", "cpu") not in fastlora.dispatch._native_kernels():
        pytest.skip("native extension unavailable")
    w = fastlora.quantize_nf4(_weight((9, 70), torch.float32), blocksize=32)
    args = (w.data, w.absmax, w.absmax_code, w.absmax2, w.offset, w.blocksize, w.numel, torch.empty(w.numel))
    torch.library.opcheck(torch.ops.fastlora.native_nf4_dequantize.default, args)


def test_compile_fullgraph(device):
    w = fastlora.quantize_nf4(_weight((16, 64), torch.float32).to(device))
    compiled = torch.compile(lambda weight: fastlora.dequantize_nf4(weight) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w), fastlora.dequantize_nf4(w) * 2)


def test_reference_matches_the_functional_api():
    w = fastlora.quantize_nf4(_weight((5, 70), torch.float16), blocksize=32)
    ref = nf4_dequantize_reference(w.data, w.absmax, w.absmax_code, w.absmax2, w.offset, w.blocksize, w.numel,
                                   torch.float16)
    assert torch.equal(ref.view(5, 70), fastlora.dequantize_nf4(w, backend="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_large_weight_needs_int64_offsets(dtype):
    shape = (2**16 + 1, 2**15 + 3)  # more than 2**31 elements
    w = fastlora.quantize_nf4(torch.ones(shape, dtype=dtype, device="cuda"), blocksize=64)
    out = fastlora.dequantize_nf4(w, backend="triton")
    assert out.shape == shape
    assert (out[-1, -8:] == 1).all() and (out[0, :8] == 1).all()
