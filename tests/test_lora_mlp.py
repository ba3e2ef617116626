"""fastlora.lora_mlp against PEFT LoRA layers on Llama-style and Phi3-style gated MLPs, and the glu op."""

import pytest
import torch
import torch.nn.functional as F

import fastlora
from fastlora import LoRAProjection
from fastlora.ops.glu import glu_reference
from fastlora.ops.lora_mlp import lora_mlp_reference
from fastlora.patching import lora_args
from fastlora.testing import assert_close_to_reference, lora_grads, make_peft_lora_layer

K, INNER = 48, 40
ACTS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}


def _x(shape=(3, 5), seed=2):
    return torch.randn(*shape, K, generator=torch.Generator().manual_seed(seed))


def _mlp(*, fused=False, dropout=0.0, bias=False, four_bit=False):
    if four_bit:
        pytest.importorskip("bitsandbytes")

    def make(k, n, seed):
        return make_peft_lora_layer(k, n, ranks=(4 + seed,), dropout=dropout, bias=bias, four_bit=four_bit,
                                    seed=seed)

    gate_up = [make(K, 2 * INNER, 0)] if fused else [make(K, INNER, 0), make(K, INNER, 1)]
    return gate_up, make(INNER, K, 2)


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
    layers = [*gate_up, down]
    x = _x()
    ref = _run(layers, x, lambda t: _peft_forward(gate_up, down, act, t))
    got = _run(layers, x, lambda t: _fastlora_forward(gate_up, down, act, t))
    _close(got, ref)
    if dropout == 0:
        _within_the_rule(gate_up, down, act, x, got, ref)


def _close(got, ref):
    """fp32 agreement on the scale of each tensor: the three GEMMs of dX sum in another order than PEFT's."""
    def check(a, b, what):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()), msg=what)

    check(got[0], ref[0], "y")
    check(got[1], ref[1], "dx")
    for g, r in zip(got[2], ref[2], strict=True):
        assert g.keys() == r.keys()
        for name in g:
            check(g[name], r[name], name)


def _within_the_rule(gate_up, down, act, x, got, ref):
    """Against fp64: at most twice PEFT's own fp32 error (plus an ulp)."""
    def p64(layer):
        p = _projection(layer)
        return LoRAProjection(p.base.double(), p.A.detach().double().requires_grad_(True),
                              p.B.detach().double().requires_grad_(True),
                              p.scaling, None if p.bias is None else p.bias.double())

    projections = [p64(layer) for layer, _ in gate_up]
    down64 = p64(down[0])
    x64 = x.double().requires_grad_(True)
    y64 = lora_mlp_reference(x64, projections, down64, act)
    (y64 * torch.randn(y64.shape, generator=torch.Generator().manual_seed(1)).double()).sum().backward()
    assert_close_to_reference(got[0], y64, ref[0], name="y")
    assert_close_to_reference(got[1], x64.grad, ref[1], name="dx")
    for p, g, r in zip([*projections, down64], got[2], ref[2], strict=True):
        assert_close_to_reference(g["A[a0]"], p.A.grad, r["A[a0]"], name="dA")
        assert_close_to_reference(g["B[a0]"], p.B.grad, r["B[a0]"], name="dB")


def test_equals_peft_over_bitsandbytes():
    gate_up, down = _mlp(four_bit=True)
    layers = [*gate_up, down]
    x = _x()
    ref = _run(layers, x, lambda t: _peft_forward(gate_up, down, "silu", t))
    got = _run(layers, x, lambda t: _fastlora_forward(gate_up, down, "silu", t))
    _close(got, ref)


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
