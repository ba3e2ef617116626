"""fastlora.lora_qkv against three PEFT LoRA layers (dense and bitsandbytes 4-bit) sharing one input."""

import importlib

import pytest
import torch

import fastlora
from fastlora.patching import lora_args
from fastlora.testing import (
    assert_close_to_reference,
    assert_grads_close_to_reference,
    lora_grads,
    make_peft_lora_layer,
    torch_twin,
)

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

K = 48
# bitsandbytes' CPU dequantize misreads 4-bit weights whose rows are not whole blocks of 64 on AVX-512 CPUs (bnb
# 0.49-0.50, recorded in tests/test_nf4.py): over 4-bit bases the rows are whole blocks, as in real models.
K_NF4 = 128

SIZES = (40, 16, 16)  # q, and k/v with fewer heads (GQA)


def _x(shape=(3, 5), seed=2, k=K):
    return torch.randn(*shape, k, generator=torch.Generator().manual_seed(seed))


def _layers(*, dropout=0.0, bias=False, four_bit=False):
    if four_bit:
        pytest.importorskip("bitsandbytes")
    k = K_NF4 if four_bit else K
    return [make_peft_lora_layer(k, n, ranks=(4 + 2 * i,), dropout=dropout, bias=bias, four_bit=four_bit, seed=i)
            for i, n in enumerate(SIZES)]


def _fastlora(layers, x):
    args = [lora_args(layer) for layer, _ in layers]
    return fastlora.lora_qkv(x, [a.base for a in args], [a.A[0] for a in args], [a.B[0] for a in args],
                             [a.scaling[0] for a in args], biases=[a.bias for a in args],
                             dropout_p=[a.dropout_p[0] for a in args], compute_dtype=args[0].compute_dtype)


def _run(layers, x, fn):
    for layer, _ in layers:
        layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(5)
    outs = fn(x)
    g = torch.Generator().manual_seed(1)
    sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    return [o.detach() for o in outs], x.grad, [lora_grads(layer, names) for layer, names in layers]


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_three_peft_layers(bias, dropout, four_bit):
    """Within twice the error of PyTorch computing the three PEFT layers in fp32 against the same layers in fp64
    (4-bit bases as the independent decoder reads them, in both)."""
    layers = _layers(dropout=dropout, bias=bias, four_bit=four_bit)
    x = _x(k=K_NF4 if four_bit else K)
    # PEFT runs the three layers one after another on the same input: the masks come in that order.
    lows = [(torch_twin(layer, torch.float32), names) for layer, names in layers]
    torch_runs = [_run(lows, x, lambda t: [layer(t) for layer, _ in lows])]
    if dropout == 0:
        torch_runs.append(_run(lows, x, lambda t: _one_down_gemm([layer for layer, _ in lows], t)))
    twins = [(torch_twin(layer), names) for layer, names in layers]
    outs64, dx64, grads64 = _run(twins, x.double(), lambda t: [layer(t) for layer, _ in twins])
    outs, dx, grads = _run(layers, x, lambda t: _fastlora(layers, t))
    for i, (got, exact, what) in enumerate(zip(outs, outs64, "qkv", strict=True)):
        assert got.dtype == torch_runs[0][0][i].dtype
        assert_close_to_reference(got, exact, [r[0][i] for r in torch_runs], name=what)
    assert_close_to_reference(dx, dx64, [r[1] for r in torch_runs], name="dx")
    for i, (got, exact) in enumerate(zip(grads, grads64, strict=True)):
        assert_grads_close_to_reference(got, exact, [r[2][i] for r in torch_runs])


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fp32_branch_variant_has_peft_numerics(dropout, monkeypatch):
    """The FP32_BRANCH variant (bf16 activations, fp32 adapters) computes the three branches in fp32, as PEFT's
    layers do without autocast: outputs and dX within a rounding or two of PEFT's, adapter gradients equal up to
    fp32 summation order (the dropout masks are the same: drawn in the adapters' dtype, in PEFT's order)."""
    qkv_ops = importlib.import_module("fastlora.ops.lora_qkv")  # the package's lora_qkv is the function
    from fastlora.ops.lora import FP32_BRANCH

    monkeypatch.setattr(qkv_ops, "_variant", lambda *args: FP32_BRANCH)
    layers = [make_peft_lora_layer(K, n, ranks=(4 + 2 * i,), dropout=dropout, bias=i == 0, seed=i,
                                   base_dtype=torch.bfloat16, adapter_dtype=torch.float32)
              for i, n in enumerate(SIZES)]
    x = _x().bfloat16()
    want, want_dx, want_grads = _run(layers, x, lambda t: [layer(t) for layer, _ in layers])
    got, dx, grads = _run(layers, x, lambda t: _fastlora(layers, t))
    for g, w, what in zip(got, want, "qkv", strict=True):
        assert g.dtype == torch.bfloat16
        bound = 2 * 2.0 ** -8 * float(w.float().abs().max())
        assert float((g.float() - w.float()).abs().max()) <= bound, what
    assert float((dx.float() - want_dx.float()).abs().max()) <= 4 * 2.0 ** -8 * float(want_dx.float().abs().max())
    for g, w in zip(grads, want_grads, strict=True):
        for key in w:
            torch.testing.assert_close(g[key], w[key], rtol=1e-5, atol=1e-6 * float(w[key].abs().max()), msg=key)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_small_m_over_nf4_reads_the_packed_weights(dropout, triton_device, monkeypatch):
    """A few tokens over 4-bit bases: each projection is one nf4_matmul, forward and backward (no dequantize),
    with the result of the three PEFT layers (the tolerance rule, as above)."""
    import importlib

    qkv_ops = importlib.import_module("fastlora.ops.lora_qkv")  # the package exports a function of that name
    calls = {"nf4_matmul": 0, "dequantize": 0}
    real_mm, real_dq = qkv_ops.nf4_matmul, qkv_ops.dequantize_nf4
    monkeypatch.setattr(qkv_ops, "nf4_matmul", lambda *a, **k: calls.__setitem__(
        "nf4_matmul", calls["nf4_matmul"] + 1) or real_mm(*a, **k))
    monkeypatch.setattr(qkv_ops, "dequantize_nf4", lambda *a, **k: calls.__setitem__(
        "dequantize", calls["dequantize"] + 1) or real_dq(*a, **k))
    layers = _layers(dropout=dropout, bias=True, four_bit=True)
    x = _x(k=K_NF4)
    lows = [(torch_twin(layer, torch.float32), names) for layer, names in layers]
    torch_run = _run(lows, x, lambda t: [layer(t) for layer, _ in lows])
    twins = [(torch_twin(layer), names) for layer, names in layers]
    outs64, dx64, grads64 = _run(twins, x.double(), lambda t: [layer(t) for layer, _ in twins])
    with fastlora.use_backend(nf4_matmul="triton"):
        outs, dx, grads = _run(layers, x, lambda t: _fastlora(layers, t))
    assert calls == {"nf4_matmul": 3, "dequantize": 0}  # the backward's dX: lora.py's nf4_matmul, not counted here
    for got, exact, low, what in zip(outs, outs64, torch_run[0], "qkv", strict=True):
        assert_close_to_reference(got, exact, low, name=what)
    assert_close_to_reference(dx, dx64, torch_run[1], name="dx")
    for got, exact, low in zip(grads, grads64, torch_run[2], strict=True):
        assert_grads_close_to_reference(got, exact, low)


def _one_down_gemm(layers, t):
    """PEFT's three layers in lora_qkv's arrangement, by PyTorch: the three A stacked into one GEMM over x (read
    once), then each B. Its fp32 rounding is PyTorch's own too, and differs from the layer-by-layer GEMMs' with the
    kernels the CPU's BLAS picks for the two shapes (test_lora.py's _one_down_gemm has the measurements)."""
    xa = torch.nn.functional.linear(t, torch.cat([layer.lora_A["a0"].weight for layer in layers]))
    outs, start = [], 0
    for layer in layers:
        r = layer.lora_A["a0"].weight.shape[0]
        outs.append(layer.get_base_layer()(t) + layer.lora_B["a0"](xa[..., start:start + r]) * layer.scaling["a0"])
        start += r
    return outs


def test_outputs_view_as_heads_and_biases_train():
    layers = _layers(bias=True)
    for layer, _ in layers:
        layer.get_base_layer().bias.requires_grad_(True)  # PEFT's bias="all"
    x = _x(shape=(2, 3))
    q, k, v = _fastlora(layers, x)
    assert q.view(2, 3, 5, 8).shape == (2, 3, 5, 8) and k.view(2, 3, 2, 8).shape == (2, 3, 2, 8)
    (q.sum() + 2 * k.sum() + 3 * v.sum()).backward()
    for weight, (layer, _) in zip((1, 2, 3), layers, strict=True):
        torch.testing.assert_close(layer.get_base_layer().bias.grad, torch.full((layer.out_features,), 6.0 * weight))


def test_bad_input():
    layers = _layers()
    args = [lora_args(layer) for layer, _ in layers]
    with pytest.raises(ValueError, match="one entry per projection"):
        fastlora.lora_qkv(_x(), [a.base for a in args], [a.A[0] for a in args[:2]], [a.B[0] for a in args],
                          [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="x has 5 features"):
        fastlora.lora_qkv(_x()[..., :5], [a.base for a in args], [a.A[0] for a in args], [a.B[0] for a in args],
                          [1.0, 1.0, 1.0])


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, K, generator=g)
    ws = [torch.randn(n, K, generator=g) for n in SIZES]
    A = [torch.randn(4, K, generator=g) for _ in SIZES]
    B = [torch.randn(n, 4, generator=g) for n in SIZES]
    biases = [torch.randn(SIZES[0], generator=g), None, None]
    xd, mask = torch.native_dropout(x, 0.3, True)
    for weights in (ws, [torch.cat(ws)]):
        torch.library.opcheck(torch.ops.fastlora.lora_qkv_fwd.default, (x, weights, biases, [x, xd, x], A, B,
                                                                         [0.5, 2.0, 1.0]))
        y, xa = torch.ops.fastlora.lora_qkv_fwd(x, weights, biases, [x, xd, x], A, B, [0.5, 2.0, 1.0])
        dy = torch.randn(y.shape, generator=g)
        torch.library.opcheck(torch.ops.fastlora.lora_qkv_bwd.default,
                              (dy, weights, xa, x, [x, xd, x], [None, mask, None], A, B, [0.5, 2.0, 1.0],
                               [0.0, 0.3, 0.0], True))
    # The branch in fp32 over bf16 activations (the FP32_BRANCH variant): XA comes back in fp32.
    xb, wb = x.bfloat16(), [w.bfloat16() for w in ws]
    fwd = (xb, wb, biases, [xb, xb, xb], A, B, [0.5, 2.0, 1.0], torch.float32)
    torch.library.opcheck(torch.ops.fastlora.lora_qkv_fwd.default, fwd)
    y, xa = torch.ops.fastlora.lora_qkv_fwd(*fwd)
    assert y.dtype == torch.bfloat16 and xa.dtype == torch.float32
    torch.library.opcheck(torch.ops.fastlora.lora_qkv_bwd.default,
                          (torch.randn(y.shape, generator=g).bfloat16(), wb, xa, xb, [xb, xb, xb], [None, None, None],
                           A, B, [0.5, 2.0, 1.0], [0.0, 0.0, 0.0], True))


def test_compile_fullgraph():
    layers = _layers(four_bit=False)
    x = _x().requires_grad_(True)
    compiled = torch.compile(lambda t: sum(o.sum() for o in _fastlora(layers, t * 2)), fullgraph=True,
                             backend="aot_eager")
    compiled(x).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    sum(layer(x_ref * 2).sum() for layer, _ in layers).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
