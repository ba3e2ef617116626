"""fastlora.lora_linear against PEFT's LoRA layers (dense and bitsandbytes 4-bit) and the fp64 reference."""

import pytest
import torch

import fastlora
from fastlora.ops.lora import lora_linear_reference
from fastlora.patching import NothingToFuse, UnsupportedLoRA, lora_args
from fastlora.testing import (
    assert_close_to_reference,
    assert_grads_close_to_reference,
    decode_nf4,
    lora_grads,
    make_peft_lora_layer,
    torch_twin,
)

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

peft_lora = pytest.importorskip("peft.tuners.lora")

K, N = 48, 40  # odd-ish sizes: not multiples of the GEMM tiles
# A bitsandbytes 4-bit base computes through bitsandbytes' own dequantize, which on AVX-512 CPUs misreads weights
# whose rows are not whole blocks of 64 (bnb 0.49-0.50; tests/test_nf4.py records it): its rows are whole blocks,
# as in every real model. fastlora's own NF4 paths at ragged K are checked against the independent decoder there.
K_NF4 = 128


def _k(four_bit):
    return K_NF4 if four_bit else K


def _peft_layer(**kwargs):
    if kwargs.get("four_bit"):
        pytest.importorskip("bitsandbytes")
    return make_peft_lora_layer(_k(kwargs.get("four_bit")), N, **kwargs)


def _fastlora_forward(layer, names, x):
    args = lora_args(layer)
    assert len(args.A) == len(names)
    return fastlora.lora_linear(x, args.base, args.A, args.B, args.scaling, bias=args.bias,
                                dropout_p=args.dropout_p, lora_bias=args.lora_bias, compute_dtype=args.compute_dtype)


_grads = lora_grads


def _run(layer, names, x, fn, seed=5):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout masks
    y = fn(x)
    g = torch.Generator().manual_seed(1)
    (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    return y.detach(), x.grad, _grads(layer, names)


def _equal_to_peft(layer, names, x):
    """fastlora's layer against PEFT's: outputs and gradients within twice the error of PyTorch computing PEFT's
    layer in fp32 against the same layer in fp64 (a 4-bit base as the independent decoder reads it, in both: a
    bitsandbytes kernel is no yardstick, it computes in other orders on other CPUs), with the same dropout masks."""
    y_ref, dx_ref, g_ref = _run(layer, names, x, layer)  # PEFT's own layer: the dtypes
    low, exact = torch_twin(layer, torch.float32), torch_twin(layer)
    lows = [_run(low, names, x, low)]
    if len(names) > 1 and (not layer.training or all(isinstance(layer.lora_dropout[n], torch.nn.Identity)
                                                     for n in names)):
        lows.append(_run(low, names, x, lambda t: _one_down_gemm(low, names, t)))
    y64, dx64, g64 = _run(exact, names, x.double(), exact)
    y, dx, g = _run(layer, names, x, lambda t: _fastlora_forward(layer, names, t))
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape and dx.dtype == dx_ref.dtype
    assert_close_to_reference(y, y64, [r[0] for r in lows], name="y")
    assert_close_to_reference(dx, dx64, [r[1] for r in lows], name="dx")
    assert {k: t.dtype for k, t in g.items()} == {k: t.dtype for k, t in g_ref.items()}
    assert_grads_close_to_reference(g, g64, [r[2] for r in lows])


def _one_down_gemm(layer, names, t):
    """PEFT's maths in lora_linear's arrangement, by PyTorch: the adapters' A stacked into one GEMM over x (fastlora
    reads x once when no dropout tells the adapters' inputs apart), then each B. Its fp32 rounding is PyTorch's own
    too, and it differs from the adapter-by-adapter GEMMs' with the kernels the CPU's BLAS picks for the two
    shapes: with AVX2 kernels (a CPU without AVX-512, emulated) X A^T for K 128 erred 5.3e-6 at N = 12 and 1.1e-6 at
    N = 8, with AVX-512 ones 5.3e-6 at both."""
    xa = torch.nn.functional.linear(t, torch.cat([layer.lora_A[n].weight for n in names]))
    y, start = layer.get_base_layer()(t), 0
    for n in names:
        r = layer.lora_A[n].weight.shape[0]
        y = y + layer.lora_B[n](xa[..., start:start + r]) * layer.scaling[n]
        start += r
    return y


def _x(dtype=torch.float32, shape=(3, 5), seed=2, k=K):
    return torch.randn(*shape, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("ranks", [(8,), (1,), (4, 16)], ids=["r8", "r1", "two adapters r4+r16"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_peft_linear_fp32(ranks, dropout, bias):
    layer, names = _peft_layer(ranks=ranks, dropout=dropout, bias=bias)
    _equal_to_peft(layer, names, _x())


def test_equals_peft_with_lora_bias_rslora_and_one_token():
    layer, names = _peft_layer(ranks=(6, 3), bias=True, lora_bias=True, rslora=True)
    _equal_to_peft(layer, names, _x(shape=(1,)))


def test_eval_mode_has_no_dropout():
    layer, names = _peft_layer(dropout=0.5)
    layer.eval()
    _equal_to_peft(layer, names, _x())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_equals_peft_bnb_linear4bit(dropout):
    layer, names = _peft_layer(ranks=(8, 4), dropout=dropout, bias=True, four_bit=True)
    _equal_to_peft(layer, names, _x(k=K_NF4))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_small_m_nf4_kernel_equals_peft_bnb(dropout, triton_device):
    """A few tokens over a 4-bit base take the kernel that reads NF4 inside the GEMM, forward and backward."""
    import fastlora.ops.lora as lora_ops

    layer, names = _peft_layer(ranks=(8, 4), dropout=dropout, bias=True, four_bit=True)
    with fastlora.use_backend(nf4_matmul="triton"):
        assert lora_ops._small_nf4(lora_args(layer).base, _x(k=K_NF4).view(-1, K_NF4))
        _equal_to_peft(layer, names, _x(k=K_NF4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("four_bit", [False, True])
def test_low_precision_within_the_tolerance_rule(dtype, adapter_dtype, four_bit):
    """Against the fp64 reference: at most twice the error of torch doing the same maths in ``dtype``."""
    adapter_dtype = dtype if adapter_dtype == "same" else adapter_dtype
    layer, names = _peft_layer(ranks=(8, 4), bias=True, four_bit=four_bit, base_dtype=dtype,
                               adapter_dtype=adapter_dtype)
    base = layer.get_base_layer()
    if four_bit:
        weight = decode_nf4(base, dtype=torch.float32)  # the independent decoder's reading of bnb's bytes
    else:
        weight = base.weight.float()
    x = _x(dtype, k=_k(four_bit))
    A = [layer.lora_A[n].weight for n in names]
    B = [layer.lora_B[n].weight for n in names]
    scalings = [layer.scaling[n] for n in names]

    def reference(t, dt):
        return lora_linear_reference(t.to(dt), weight.to(dt), [a.to(dt) for a in A], [b.to(dt) for b in B],
                                     scalings, bias=base.bias.to(dt))

    leaves = {}

    def track(dt):
        # Fresh leaves per run: the gradients of A and B in this precision.
        As = [a.detach().to(dt).requires_grad_(True) for a in A]
        Bs = [b.detach().to(dt).requires_grad_(True) for b in B]
        leaves[dt] = (As, Bs)
        return As, Bs

    ys = {}
    for dt in (torch.float64, dtype):
        As, Bs = track(dt)
        t = x.detach().to(dt).requires_grad_(True)
        y = lora_linear_reference(t, weight.to(dt), As, Bs, scalings, bias=base.bias.to(dt))
        y.float().mul(torch.linspace(-1, 1, N)).sum().backward()
        ys[dt] = (y, t.grad)
    t = x.detach().clone().requires_grad_(True)
    y = _fastlora_forward(layer, names, t)
    y.float().mul(torch.linspace(-1, 1, N)).sum().backward()
    assert y.dtype == dtype
    where = f"{dtype} adapters {adapter_dtype} {'nf4' if four_bit else 'dense'}"
    assert_close_to_reference(y, ys[torch.float64][0], ys[dtype][0], name=f"{where} y")
    assert_close_to_reference(t.grad, ys[torch.float64][1], ys[dtype][1], name=f"{where} dx")
    for i, n in enumerate(names):
        got_a, got_b = layer.lora_A[n].weight.grad, layer.lora_B[n].weight.grad
        assert got_a.dtype == adapter_dtype and got_b.dtype == adapter_dtype
        (a64, b64), (al, bl) = (leaves[torch.float64][0][i], leaves[torch.float64][1][i]), \
            (leaves[dtype][0][i], leaves[dtype][1][i])
        assert_close_to_reference(got_a, a64.grad, al.grad, ulps=2, name=f"{where} dA[{n}]")
        assert_close_to_reference(got_b, b64.grad, bl.grad, ulps=2, name=f"{where} dB[{n}]")


def _within_bf16_roundings(got, want, roundings, name):
    """``got`` within a few bf16 roundings of ``want``'s largest magnitude (the two round at different steps)."""
    bound = roundings * 2.0 ** -8 * float(want.float().abs().max())
    err = float((got.float() - want.float()).abs().max())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("four_bit", [False, True])
def test_fp32_branch_variant_has_peft_numerics(four_bit, monkeypatch):
    """The FP32_BRANCH variant (bf16 activations, fp32 adapters) computes the LoRA branch in fp32, as PEFT does
    without autocast: the output and dX within a rounding or two of PEFT's (each rounds the branch's term at a
    different step), the adapters' gradients equal up to fp32 summation order."""
    import fastlora.ops.lora as lora_ops

    monkeypatch.setattr(lora_ops, "_variant", lambda *args: lora_ops.FP32_BRANCH)
    layer, names = _peft_layer(ranks=(8, 4), bias=True, four_bit=four_bit, base_dtype=torch.bfloat16,
                               adapter_dtype=torch.float32)
    x = _x(torch.bfloat16, k=_k(four_bit))
    want_y, want_dx, want_grads = _run(layer, names, x, layer)
    y, dx, grads = _run(layer, names, x, lambda t: _fastlora_forward(layer, names, t))
    assert y.dtype == dx.dtype == torch.bfloat16
    _within_bf16_roundings(y, want_y, 2, "y")
    _within_bf16_roundings(dx, want_dx, 3, "dx")
    for key, want in want_grads.items():
        assert grads[key].dtype == torch.float32
        torch.testing.assert_close(grads[key], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=key)


def test_frozen_base_and_no_grad():
    layer, names = _peft_layer()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(_fastlora_forward(layer, names, x), layer(x))
    w = torch.randn(N, K, requires_grad=True)
    with pytest.raises(ValueError, match="base requires grad"):
        fastlora.lora_linear(x, w, torch.randn(4, K), torch.randn(N, 4), 1.0)


def test_only_x_needs_grad():
    """A frozen adapter (another adapter being trained elsewhere) still passes the gradient to x."""
    layer, names = _peft_layer()
    for p in layer.parameters():
        p.requires_grad_(False)
    x = _x().requires_grad_(True)
    _fastlora_forward(layer, names, x).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_bad_input_names_the_argument():
    x, w = _x(), torch.randn(N, K)
    a, b = torch.randn(4, K), torch.randn(N, 4)
    with pytest.raises(ValueError, match="x has 47 features, base expects 48"):
        fastlora.lora_linear(x[..., :47], w, a, b, 1.0)
    with pytest.raises(ValueError, match="expected A \\[r, 48\\] and B \\[40, r\\]"):
        fastlora.lora_linear(x, w, a, b[:, :3], 1.0)
    with pytest.raises(ValueError, match="scaling has 1 entries for 2 adapters"):
        fastlora.lora_linear(x, w, [a, a], [b, b], [1.0])
    with pytest.raises(ValueError, match="dropout_p of the adapter must be in"):
        fastlora.lora_linear(x, w, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="bias must be \\[40\\]"):
        fastlora.lora_linear(x, w, a, b, 1.0, bias=torch.zeros(3))
    with pytest.raises(TypeError, match="base must be a tensor or an NF4Weight"):
        fastlora.lora_linear(x, "w", a, b, 1.0)
    with pytest.raises(TypeError, match="x must be a float32"):
        fastlora.lora_linear(x.long(), w, a, b, 1.0)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(7, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    A = [torch.randn(4, K, generator=g), torch.randn(2, K, generator=g)]
    B = [torch.randn(N, 4, generator=g), torch.randn(N, 2, generator=g)]
    xd, mask = torch.native_dropout(x, 0.3, True)
    torch.library.opcheck(torch.ops.fastlora.lora_linear_fwd.default, (x, w, bias, [x, xd], A, B, [0.5, 2.0],
                                                                        [None, torch.randn(N, generator=g)]))
    y, xa = torch.ops.fastlora.lora_linear_fwd(x, w, None, [x, xd], A, B, [0.5, 2.0], [None, None])
    dy = torch.randn(7, N, generator=g)
    torch.library.opcheck(torch.ops.fastlora.lora_linear_bwd.default,
                          (dy, w, xa, x, [x, xd], [None, mask], A, B, [0.5, 2.0], [0.0, 0.3], [False, True], True))
    # The branch in fp32 over bf16 activations (the FP32_BRANCH variant): XA comes back in fp32.
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.library.opcheck(torch.ops.fastlora.lora_linear_fwd.default,
                          (xb, wb, None, [xb], A[:1], B[:1], [0.5], [None], torch.float32))
    y, xa = torch.ops.fastlora.lora_linear_fwd(xb, wb, None, [xb], A[:1], B[:1], [0.5], [None], torch.float32)
    assert y.dtype == torch.bfloat16 and xa.dtype == torch.float32
    torch.library.opcheck(torch.ops.fastlora.lora_linear_bwd.default,
                          (dy.bfloat16(), wb, xa, xb, [xb], [None], A[:1], B[:1], [0.5], [0.0], [False], True))


def test_compile_fullgraph():
    layer, names = _peft_layer(ranks=(8,))
    x = _x().requires_grad_(True)
    compiled = torch.compile(lambda t: _fastlora_forward(layer, names, t * 2), fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    got = (x.grad, layer.lora_A["a0"].weight.grad.clone())
    layer.zero_grad(set_to_none=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x_ref * 2).sum().backward()
    torch.testing.assert_close(got[0], x_ref.grad)
    torch.testing.assert_close(got[1], layer.lora_A["a0"].weight.grad)


def test_nf4_base_is_dequantized_once_per_pass_into_one_buffer(monkeypatch):
    import fastlora.ops.lora as lora_ops

    calls = []
    real = lora_ops.dequantize_nf4

    def counting(w, **kwargs):
        out = real(w, **kwargs)
        calls.append(out.data_ptr())
        return out

    monkeypatch.setattr(lora_ops, "dequantize_nf4", counting)
    layer, names = _peft_layer(ranks=(8, 4), four_bit=True)
    x = _x(k=K_NF4).requires_grad_(True)
    y = _fastlora_forward(layer, names, x)
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 2  # the backward's dX
    # A second layer's forward reuses the forward's buffer.
    other, other_names = _peft_layer(ranks=(8,), four_bit=True, seed=3)
    _fastlora_forward(other, other_names, x)
    assert calls[2] == calls[0]
    # Without a gradient for x, the backward needs no base weight at all.
    _fastlora_forward(layer, names, x.detach()).sum().backward()
    assert len(calls) == 4


def test_lora_args_refuses_variants_and_follows_peft_state():
    layer, names = _peft_layer(ranks=(4, 2))
    layer.set_adapter(["a1"])
    assert len(lora_args(layer).A) == 1 and lora_args(layer).A[0] is layer.lora_A["a1"].weight
    layer.scaling["a1"] = 0.25  # PEFT may change it at run time: read on every call
    assert lora_args(layer).scaling == [0.25]
    layer.enable_adapters(False)
    with pytest.raises(NothingToFuse, match="adapters disabled"):  # an UnsupportedLoRA that is not a fallback
        lora_args(layer)
    layer.enable_adapters(True)
    dora = peft_lora.Linear(torch.nn.Linear(K, N).requires_grad_(False), "d",
                            peft_lora.LoraConfig(r=4, lora_alpha=8, use_dora=True), r=4, lora_alpha=8)
    with pytest.raises(UnsupportedLoRA, match="DoRA adapter 'd'"):
        lora_args(dora)


def _nf4_ops_under(backend, monkeypatch):
    """lora_linear (a few rows: the fused NF4 GEMM's case), lora_qkv and lora_mlp over NF4 bases under
    ``use_backend(backend)``: their outputs and gradients, and how many times the C++ dequantize ran."""
    from fastlora.ops.lora_mlp import LoRAProjection

    native = torch.ops.fastlora.native_nf4_dequantize
    calls = []
    monkeypatch.setattr(torch.ops.fastlora, "native_nf4_dequantize", lambda *a: calls.append(1) or native(*a))
    g = torch.Generator().manual_seed(0)
    k, n, inter, r = 64, 48, 96, 4
    w, w_up, w_down = (fastlora.quantize_nf4(torch.randn(shape, generator=g)) for shape in ((n, k), (inter, k),
                                                                                            (k, inter)))
    leaves = [torch.randn(shape, generator=g).requires_grad_(True)
              for shape in ((2, 3, k), (r, k), (n, r), (r, k), (inter, r), (r, inter), (k, r))]
    x, a, b, a_up, b_up, a_down, b_down = leaves
    out = {}
    with fastlora.use_backend(backend):
        out["lora_linear"] = fastlora.lora_linear(x, w, a, b, 2.0)
        out["lora_qkv"] = torch.cat(fastlora.lora_qkv(x, [w, w], [a, a], [b, b], [2.0, 0.5]), -1)
        for y in out.values():
            y.square().sum().backward()
        # glu has no C++ kernel: under use_backend("cpp") it needs its own request (see the test below).
        with fastlora.use_backend(glu="torch"):
            out["lora_mlp"] = fastlora.lora_mlp(x, [LoRAProjection(w_up, a_up, b_up, 2.0),
                                                    LoRAProjection(w_up, a_up, b_up, 0.5)],
                                                LoRAProjection(w_down, a_down, b_down, 2.0))
            out["lora_mlp"].square().sum().backward()
    grads = {name: t.grad for name, t in zip("x a b a_up b_up a_down b_down".split(), leaves, strict=True)}
    return out, grads, len(calls)


def test_nf4_ops_run_under_use_backend_cpp(monkeypatch):
    """use_backend("cpp") forces every op to its C++ kernel. The fused small-M NF4 GEMM has none (Triton only), so
    lora_linear must answer "not here" and dequantize (in C++) then GEMM, not raise for nf4_matmul."""
    if ("nf4_dequantize", "cpu") not in fastlora.dispatch._native_kernels():
        pytest.skip(f"native extension unavailable: {fastlora._native.load_error()}")
    got, got_grads, native_calls = _nf4_ops_under("cpp", monkeypatch)
    # Forward and backward: lora_linear 1 + 1, lora_qkv 2 + 2, lora_mlp 3 + 3 (gate/up dequantized again
    # for dX, down for dH).
    assert native_calls == 12
    want, want_grads, torch_calls = _nf4_ops_under("torch", monkeypatch)
    assert torch_calls == 0
    for name in want:  # the C++ dequantize is bit-exact to the reference: the same GEMMs follow
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0, atol=0, msg=name)


def test_nf4_backend_requests_that_cannot_run_still_raise():
    from fastlora.ops.lora_mlp import LoRAProjection

    w = fastlora.quantize_nf4(torch.randn(N, K))
    x, a, b = torch.randn(3, K), torch.randn(4, K), torch.randn(N, 4)
    # A request naming the fused op itself is held to.
    with fastlora.use_backend(nf4_matmul="cpp"), pytest.raises(fastlora.BackendUnavailableError,
                                                               match="nf4_matmul has no cpp implementation"):
        fastlora.lora_linear(x, w, a, b, 2.0)
    # glu is called, not asked about: with no C++ kernel it cannot honour use_backend("cpp").
    up = LoRAProjection(torch.randn(2 * N, K), torch.randn(4, K), torch.randn(2 * N, 4), 1.0)
    down = LoRAProjection(torch.randn(K, N), torch.randn(4, N), torch.randn(K, 4), 1.0)
    with fastlora.use_backend("cpp"), pytest.raises(fastlora.BackendUnavailableError,
                                                    match="glu has no cpp implementation"):
        fastlora.lora_mlp(x, [up], down)
