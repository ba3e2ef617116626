"""fastlora.lora_mlp against PEFT LoRA layers on Llama-style and Phi3-style gated MLPs, and the glu op."""

import pytest
import torch
import torch.nn.functional as F

import fastlora
from fastlora import LoRAProjection
from fastlora.ops.glu import glu_reference
from fastlora.patching import lora_args
from fastlora.testing import (
    assert_close_to_reference,
    assert_pooled_close_to_reference,
    lora_grads,
    make_peft_lora_layer,
    torch_twin,
)

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

K, INNER = 48, 40
# bitsandbytes' CPU dequantize misreads 4-bit weights whose rows are not whole blocks of 64 on AVX-512 CPUs (bnb
# 0.49-0.50, recorded in tests/test_nf4.py): over a 4-bit base both layers' rows are whole blocks, as in real models.
K_NF4, INNER_NF4 = 128, 64
ACTS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}


def _x(shape=(3, 5), seed=2, k=K):
    return torch.randn(*shape, k, generator=torch.Generator().manual_seed(seed))


def _mlp(*, fused=False, dropout=0.0, bias=False, four_bit=False):
    if four_bit:
        pytest.importorskip("bitsandbytes")
    k, inner = (K_NF4, INNER_NF4) if four_bit else (K, INNER)

    def make(k, n, seed):
        return make_peft_lora_layer(k, n, ranks=(4 + seed,), dropout=dropout, bias=bias, four_bit=four_bit,
                                    seed=seed)

    gate_up = [make(k, 2 * inner, 0)] if fused else [make(k, inner, 0), make(k, inner, 1)]
    return gate_up, make(inner, k, 2)


def _projection(layer):
    args = lora_args(layer)
    return LoRAProjection(args.base, args.A[0], args.B[0], args.scaling[0], args.bias, args.dropout_p[0])


def _peft_forward(gate_up, down, act, x):
    outs = [layer(x) for layer, _ in gate_up]
    g, u = outs if len(outs) == 2 else outs[0].chunk(2, dim=-1)
    return down[0](ACTS[act](g) * u)


def _fastlora_forward(gate_up, down, act, x):
    return fastlora.lora_mlp(x, [_projection(layer) for layer, _ in gate_up], _projection(down[0]), activation=act,
                             compute_dtype=lora_args(down[0]).compute_dtype)


def _run(layers, x, fn):
    for layer, _ in layers:
        layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(5)
    y = fn(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return y.detach(), x.grad, [lora_grads(layer, names) for layer, names in layers]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("fused", [False, True], ids=["gate+up", "fused gate_up"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_equals_peft_mlp(act, fused, dropout):
    gate_up, down = _mlp(fused=fused, dropout=dropout, bias=True)
    _equal_to_peft(gate_up, down, act, _x())


def _equal_to_peft(gate_up, down, act, x):
    """fastlora's MLP against PEFT's layers: outputs and LoRA gradients within twice the error of PyTorch computing
    PEFT's layers in fp32 against the same layers in fp64 (4-bit bases as the independent decoder reads them, in
    both), with the same dropout masks."""
    layers = [*gate_up, down]
    gate_up32 = [(torch_twin(layer, torch.float32), names) for layer, names in gate_up]
    down32 = (torch_twin(down[0], torch.float32), down[1])
    ref = _run([*gate_up32, down32], x, lambda t: _peft_forward(gate_up32, down32, act, t))
    got = _run(layers, x, lambda t: _fastlora_forward(gate_up, down, act, t))
    gate_up64 = [(torch_twin(layer), names) for layer, names in gate_up]
    down64 = (torch_twin(down[0]), down[1])
    exact = _run([*gate_up64, down64], x.double(), lambda t: _peft_forward(gate_up64, down64, act, t))
    assert_close_to_reference(got[0], exact[0], ref[0], name="y")
    assert_close_to_reference(got[1], exact[1], ref[1], name="dx")
    # The LoRA gradients normwise, tensor by tensor: the backward's activation gradient (recomputed, in closed form)
    # rounds differently from autograd's, and the two sit a few ulps apart per element (fastlora up to 3-6 ulps of
    # an element where PEFT had 1-2, with AVX-512, AVX2 and portable kernels alike; normwise ratio 0.9-2.05).
    for i, (g, e, r) in enumerate(zip(got[2], exact[2], ref[2], strict=True)):
        assert g.keys() == e.keys() == r.keys()
        for k in g:
            assert g[k].dtype == r[k].dtype
            assert_pooled_close_to_reference([g[k]], [e[k]], [r[k]], ulps=4, name=f"projection {i} {k}")


def test_equals_peft_over_bitsandbytes():
    gate_up, down = _mlp(four_bit=True)
    _equal_to_peft(gate_up, down, "silu", _x(k=K_NF4))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_small_m_over_nf4_reads_the_packed_weights(dropout, triton_device, monkeypatch):
    """A few tokens over 4-bit bases: every projection reads its packed weight in nf4_matmul, forward and
    backward; nothing is dequantized; the result is PEFT's (as above)."""
    import importlib

    dequantized = []
    for name in ("fastlora.ops.lora", "fastlora.ops.lora_qkv"):  # modules: fastlora.ops exports functions so named
        module = importlib.import_module(name)
        real = module.dequantize_nf4
        monkeypatch.setattr(module, "dequantize_nf4",
                            lambda *a, _real=real, **k: dequantized.append(1) or _real(*a, **k))
    gate_up, down = _mlp(four_bit=True, dropout=dropout, bias=True)
    with fastlora.use_backend(nf4_matmul="triton"):
        _equal_to_peft(gate_up, down, "silu", _x(k=K_NF4))
    assert not dequantized


def test_activation_is_not_stored():
    """Saved for the backward: x, the [M, 2I] gate_up output and thin [M, r] tensors, never [M, I] h."""
    gate_up, down = _mlp()
    x = _x(shape=(7,)).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = _fastlora_forward(gate_up, down, "silu", x)
    assert (7, 2 * INNER) in saved and (7, INNER) not in saved, saved
    y.sum().backward()


def test_second_backward_is_refused():
    gate_up, down = _mlp()
    y = _fastlora_forward(gate_up, down, "silu", _x().requires_grad_(True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        y.sum().backward()


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_glu_triton(act, dtype, triton_device):
    g = torch.Generator().manual_seed(0)
    gu = (2 * torch.randn(5, 2 * 37, generator=g)).to(triton_device, dtype)
    h = torch.ops.fastlora.glu_fwd(gu, act, "triton")
    ref64 = glu_reference(gu.double(), act)
    g64, u64 = gu.double().chunk(2, dim=-1)
    assert_close_to_reference(h, (ACTS[act](g64) * u64), glu_reference(gu, act), ulps=2, name=f"{act} h")
    dh = torch.randn(5, 37, generator=g).to(triton_device, dtype)
    grad = gu.clone()
    torch.ops.fastlora.glu_bwd_(dh, grad, act, "triton")
    leaf = gu.double().requires_grad_(True)
    glu_reference(leaf, act).backward(dh.double())
    low = gu.float().requires_grad_(True)
    (ACTS[act](low[:, :37].to(dtype).float()) * low[:, 37:]).to(dtype).float().backward(dh.float())
    assert_close_to_reference(grad, leaf.grad, low.grad.to(dtype), ulps=2, atol=1e-5, name=f"{act} dgu")
    assert ref64.shape == (5, 37)


def test_opcheck():
    gu = torch.randn(4, 2 * 9)
    for act in ACTS:
        torch.library.opcheck(torch.ops.fastlora.glu_fwd.default, (gu, act, "torch"))
        torch.library.opcheck(torch.ops.fastlora.glu_bwd_.default, (torch.randn(4, 9), gu.clone(), act, "torch"))


def test_bad_input():
    gate_up, down = _mlp()
    with pytest.raises(ValueError, match="activation must be one of"):
        fastlora.lora_mlp(_x(), [_projection(layer) for layer, _ in gate_up], _projection(down[0]),
                          activation="relu")
    with pytest.raises(TypeError, match="gate_up must be"):
        fastlora.lora_mlp(_x(), [], _projection(down[0]))


def test_compile_fullgraph():
    gate_up, down = _mlp()
    x = _x().requires_grad_(True)
    compiled = torch.compile(lambda t: _fastlora_forward(gate_up, down, "silu", t * 2), fullgraph=True,
                             backend="aot_eager")
    compiled(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    _fastlora_forward(gate_up, down, "silu", x_ref * 2).sum().backward()  # eager: the same ops in the same order
    torch.testing.assert_close(x.grad, x_ref.grad)
