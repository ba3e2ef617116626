"""NF4: the format against an independent decoder (fastlora.testing's oracle), bitsandbytes' bytes, its dequantize
where that is sane on this machine, every dequantization backend, and bad input."""

import functools
import warnings

import pytest
import torch

import fastlora
from fastlora.ops.nf4 import nf4_dequantize_reference
from fastlora.ops.nf4_weight import NF4_CODE, NF4Weight, dynamic_map
from fastlora.testing import NF4_VALUES, bnb_dequantize_is_sane, decode_nf4, decode_nf4_bytes

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd element counts, rows not a multiple of the blocksize (blocks cross rows; (40, 96) is one bitsandbytes' CPU
# dequantize misreads), one element, a 1-D weight.
SHAPES = [(5, 70), (33, 129), (7,), (1, 1), (64, 64), (40, 96)]
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


def _nf4_error_bound(absmax, blocksize, numel):
    """Per element: how far a correct NF4 round trip can land from the weight (half the widest gap between
    neighbouring NF4 values, times the block's absmax), plus fp32 rounding."""
    half_gap = float(torch.tensor(NF4_VALUES).diff().max()) / 2
    return (absmax.float() * (half_gap + 1e-6)).repeat_interleave(blocksize)[:numel]


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), BF.create_dynamic_map())


def test_oracle_table_is_the_nf4_code():
    assert torch.equal(torch.tensor(NF4_VALUES), BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(torch.tensor(NF4_VALUES), torch.tensor(NF4_CODE))


def test_oracle_decodes_hand_computed_bytes():
    """The oracle against values worked out by hand from the format, so that it is not checked against itself."""
    u8 = lambda *b: torch.tensor(b, dtype=torch.uint8)  # noqa: E731
    # Nibbles 0, 15 | 7, 8 | 10 (the low nibble 3 of the last byte is padding): even elements in the high nibble.
    got = decode_nf4_bytes(u8(0x0F, 0x78, 0xA3), torch.tensor([2.0]), (5,), torch.float32, 64)
    assert got.tolist() == [-2.0, 2.0, 0.0, 2 * 0.07958029955625534, 2 * 0.24611230194568634]
    # Blocks of 32 over the flat index of a [3, 24] weight: block 1 starts at row 1, column 8. 0xF0: +1, -1.
    got = decode_nf4_bytes(u8(*[0xF0] * 36), torch.tensor([1.0, 2.0, 4.0]), (3, 24), torch.float32, 32)
    assert got.tolist() == [[1, -1] * 12, [1, -1] * 4 + [2, -2] * 8, [2, -2] * 8 + [4, -4] * 4]
    # One rounding, fp32 product to dtype: 1/3 is 0.333984375 in bf16 and 0.333251953125 in fp16.
    third = torch.tensor([1 / 3], dtype=torch.float32)
    assert decode_nf4_bytes(u8(0xF0), third, (1,), torch.bfloat16, 64).item() == 0.333984375
    assert decode_nf4_bytes(u8(0xF0), third, (1,), torch.float16, 64).item() == 0.333251953125
    # Double quantization: absmax[b] = code[u8] * absmax2[b // 256] + offset; code 0.5 * 512 + 1.5 = 257.5, which
    # is 258 decoded in bf16 (its spacing is 2 there); code 0.1 * 1 + 0 is 0.1f, or 0.10009765625 in bf16.
    code = torch.zeros(256)
    code[7], code[9] = 0.5, 0.1
    for absmax2, offset, fp32, bf16 in (([512.0], 1.5, 257.5, 258.0), ([1.0], 0.0, code[9].item(), 0.10009765625)):
        for nested_dtype, expected in ((torch.float32, fp32), (torch.bfloat16, bf16)):
            got = decode_nf4_bytes(u8(*[0xFF] * 32), u8(7 if offset else 9, 7), (64,), torch.float32, 32,
                                   absmax_code=code, absmax2=torch.tensor(absmax2), offset=torch.tensor(offset),
                                   nested_dtype=nested_dtype)
            assert got[:32].tolist() == [expected] * 32, (absmax2, offset, nested_dtype)
    assert torch.equal(got[32:], torch.full((32,), 0.5))  # code 0.5 * 1 + 0, every dtype alike


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


@functools.cache
def _dequant_case(shape, blocksize, nested, dtype):
    """bitsandbytes' bytes for a random weight (its quantize is right everywhere), and the oracle's decode of them;
    shared by the tests below (read only)."""
    w = _weight(shape, dtype, seed=len(shape) + blocksize, scale=2.0)
    q, state = _bnb_quantize(w, blocksize, nested)
    return q, state, decode_nf4(q, state)


def _check_backend(backend, device):
    """Every backend against the oracle decoding bitsandbytes' bytes."""
    for shape, blocksize, nested, dtype in _dequant_cases():
        q, state, expected = _dequant_case(shape, blocksize, nested, dtype)
        expected = expected.to(device)
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


def test_bit_exact_with_bitsandbytes_where_its_dequantize_is_sane():
    """fastlora against bitsandbytes' own dequantize, on the shapes where bitsandbytes decodes its bytes correctly on
    this machine (checked first): all of them but rows that are not whole blocks on an AVX-512 CPU."""
    compared = set()
    for shape, blocksize, nested, dtype in _dequant_cases():
        if not bnb_dequantize_is_sane(shape, blocksize, dtype=dtype, nested=nested):
            continue
        q, state, _ = _dequant_case(shape, blocksize, nested, dtype)
        expected = BF.dequantize_4bit(q, state).reshape(shape)
        assert torch.equal(fastlora.dequantize_nf4(_from_state(q, state)), expected), (shape, blocksize, nested, dtype)
        compared.add((shape, blocksize, nested, dtype))
    # Whole-block rows, one row, one block: bitsandbytes reads all of these right. This is the premise of every test
    # with a bitsandbytes layer in the loop, stated once here; the others compare with bitsandbytes only where
    # bnb_dequantize_is_sane says so, and always with the independent decoder.
    for shape, blocksize in (((64, 64), 32), ((64, 64), 64), ((7,), 64), ((1, 1), 32), ((5, 70), 4096)):
        assert {(shape, blocksize, n, d) for n in (False, True) for d in DTYPES} <= compared, (shape, blocksize)


def test_bnb_cpu_dequantize_defect_is_recorded():
    """bitsandbytes 0.49-0.50 on AVX-512 CPUs writes the right bytes for a weight whose rows are not whole blocks but
    its CPU dequantize misreads them (its vectorised kernel takes each row's blocks from the row index). Records the
    defect while it lasts, and that bnb_dequantize_is_sane catches it."""
    shape, blocksize = (40, 96), 64
    w = _weight(shape, torch.float32, seed=5, scale=2.0)
    q, state = _bnb_quantize(w, blocksize, False)
    bound = _nf4_error_bound(state.absmax, blocksize, w.numel()).view(shape)
    decoded = decode_nf4(q, state)
    assert ((decoded - w).abs() <= bound).all(), "bitsandbytes' bytes do not decode to its weight"
    assert torch.equal(fastlora.dequantize_nf4(_from_state(q, state)), decoded)
    theirs = BF.dequantize_4bit(q, state)
    if torch.equal(theirs, decoded):
        assert bnb_dequantize_is_sane(shape, blocksize)
        pytest.skip("bitsandbytes' CPU dequantize is right here (fixed, or another CPU)")
    assert ((theirs - w).abs() > bound).any(), "bitsandbytes' dequantize differs, but within NF4's own error"
    assert not bnb_dequantize_is_sane(shape, blocksize)


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
    assert torch.equal(out, decode_nf4(w))


def test_dtype_override():
    w = fastlora.quantize_nf4(_weight((8, 64), torch.bfloat16))
    full = fastlora.dequantize_nf4(w, dtype=torch.float32)
    assert full.dtype == torch.float32
    assert torch.equal(full, decode_nf4(w, dtype=torch.float32))
    assert torch.equal(full.to(torch.bfloat16), fastlora.dequantize_nf4(w))


def test_from_bnb_is_zero_copy_and_round_trips():
    layer = bnb.nn.Linear4bit(96, 40, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    w = NF4Weight.from_bnb(layer)
    assert w.data.data_ptr() == layer.weight.data.data_ptr()
    assert w.absmax.data_ptr() == layer.weight.quant_state.absmax.data_ptr()
    assert w.shape == (40, 96) and w.nested
    assert torch.equal(fastlora.dequantize_nf4(w), decode_nf4(layer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rows not whole blocks: see test_to_bnb_warns_...
        param = w.to_bnb()
    assert param.data.data_ptr() == w.data.data_ptr()
    again = NF4Weight.from_bnb(param)
    assert all(torch.equal(getattr(again, f), getattr(w, f)) for f in ("data", "absmax", "absmax2", "offset"))
    assert torch.equal(decode_nf4(param), fastlora.dequantize_nf4(w))
    if bnb_dequantize_is_sane((40, 96), 64, nested=True):
        assert torch.equal(BF.dequantize_4bit(param.data, param.quant_state), fastlora.dequantize_nf4(w))


def test_linear4bit_holding_our_weight():
    torch.manual_seed(0)
    # A forward through bitsandbytes: rows of whole blocks (as in every real model), which its CPU dequantize reads
    # right; it misreads rows that are not (test_bnb_cpu_dequantize_defect_is_recorded).
    dense = torch.randn(40, 128)
    layer = bnb.nn.Linear4bit(128, 40, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    layer.train()  # eval mode on an AVX512-BF16 CPU would repack the weight into another layout
    w = fastlora.quantize_nf4(dense, blocksize=64)
    layer.weight = w.to_bnb()
    x = torch.randn(3, 128)
    expected = torch.nn.functional.linear(x, decode_nf4(w), layer.bias)
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
    assert torch.equal(fastlora.dequantize_nf4(nf4), decode_nf4(param))
    if bnb_dequantize_is_sane((16, 64), 64, dtype=torch.bfloat16, nested=True):
        assert torch.equal(fastlora.dequantize_nf4(nf4), BF.dequantize_4bit(q, state))


@pytest.mark.parametrize("nested_dtype", [torch.bfloat16, torch.float16])
def test_from_bnb_decodes_nested_absmax_in_state2_dtype(nested_dtype):
    """bitsandbytes decodes the second level of double quantization in state2.dtype (bf16 in a checkpoint saved with
    nested_dtype bf16, or after its CPU repack is undone); an fp32 decode differs in the last bits."""
    shape = (64, 256)  # whole-block rows, so that bitsandbytes' own dequantize is a fair reference on CPU
    w = _weight(shape, torch.float32, seed=11, scale=3.0)
    q, state = _bnb_quantize(w, 64, True)
    state.state2.dtype = nested_dtype  # what QuantState.from_dict makes of nested_dtype in a checkpoint
    param = bnb.nn.Params4bit(q, quant_state=state, bnb_quantized=True, quant_type="nf4", blocksize=64)
    nf4 = NF4Weight.from_bnb(param)
    assert nf4.data.data_ptr() == q.data_ptr() and not nf4.nested
    as_fp32 = decode_nf4_bytes(q, state.absmax, shape, torch.float32, 64, absmax_code=state.state2.code,
                               absmax2=state.state2.absmax, offset=state.offset)
    assert not torch.equal(as_fp32, decode_nf4(param, dtype=torch.float32)), "the test shows nothing"
    for dtype in DTYPES:
        state.dtype = dtype
        expected = decode_nf4(param)  # the independent decoder, in state2.dtype
        assert torch.equal(fastlora.dequantize_nf4(nf4, dtype=dtype), expected), dtype
        if bnb_dequantize_is_sane(shape, 64, dtype=dtype, nested=True):  # and bitsandbytes' own decode agrees
            assert torch.equal(BF.dequantize_4bit(q, state), expected), dtype
    state.dtype = torch.float32
    again = nf4.to_bnb()
    assert torch.equal(decode_nf4(again), decode_nf4(param))
    assert torch.equal(BF.dequantize_4bit(again.data, again.quant_state), BF.dequantize_4bit(q, state))
    assert all(torch.equal(getattr(NF4Weight.from_bnb(again), f), getattr(nf4, f)) for f in ("data", "absmax"))


def test_from_bnb_reads_a_weight_bitsandbytes_repacked_and_unpacked():
    """An eval-mode forward on an AVX512-BF16 CPU repacks a Linear4bit's weight; state_dict() unpacks it with
    state2.dtype bf16 (for a bf16 weight). fastlora reads the unpacked weight as bitsandbytes does."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 64, quant_type="nf4", compute_dtype=torch.bfloat16)  # repack needs N % 32 == 0
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 256, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4")
    layer = layer.to("cpu").eval()
    with torch.no_grad():
        layer(torch.randn(2, 256, dtype=torch.bfloat16))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the weight here (a CPU without AVX512-BF16?)")
    with pytest.raises(ValueError, match="repacked by bitsandbytes for CPU inference"):
        NF4Weight.from_bnb(layer)
    layer.state_dict()
    state = layer.weight.quant_state
    assert state.state2.dtype == torch.bfloat16 and not state.packing_format_for_cpu
    expected = decode_nf4(layer)
    assert torch.equal(fastlora.dequantize_nf4(NF4Weight.from_bnb(layer)), expected)
    if bnb_dequantize_is_sane((64, 256), 64, dtype=torch.bfloat16, nested=True):
        assert torch.equal(BF.dequantize_4bit(layer.weight.data, state), expected)


def test_to_bnb_warns_where_bnb_cpu_dequantize_misreads():
    """A CPU weight whose rows are not whole blocks warns, if (and only if) bitsandbytes misreads such a weight."""
    for shape in ((40, 96), (8, 32), (5, 70), (1, 96), (40, 128)):
        w = fastlora.quantize_nf4(_weight(shape, torch.float32), blocksize=64)
        if bnb_dequantize_is_sane(shape, 64):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                w.to_bnb()
        else:
            pattern = rf"bitsandbytes' CPU dequantize misreads a 4-bit weight of shape \({shape[0]}, {shape[1]}\)"
            with pytest.warns(UserWarning, match=pattern):
                w.to_bnb()
    assert bnb_dequantize_is_sane((40, 128), 64)


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
