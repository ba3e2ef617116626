"""The ops and a patched model under ``torch.autocast`` (what HF Trainer's ``bf16=True`` runs the forward in), on
the CPU's bf16 autocast. Before autocast was handled, a patched fp32 model failed there ("mat1 and mat2 must have
the same dtype"): autocast recast the GEMMs inside the ops.
"""

import copy
import math

import pytest
import torch

import fastlora
from fastlora.ops.lora import lora_linear_reference
from fastlora.ops.lora_mlp import lora_mlp_reference
from fastlora.ops.nf4_matmul import nf4_matmul
from fastlora.patching import FAMILIES, lora_args
from fastlora.testing import (
    assert_close_to_reference,
    decode_nf4,
    lora_grads,
    make_peft_lora_layer,
    peft_lora_model,
    torch_twin,
)

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

pytest.importorskip("peft")

BF16 = torch.bfloat16
K, N = 48, 40
VOCAB = 128
BATCHES = 4


def _autocast(enabled=True):
    return torch.autocast("cpu", dtype=BF16, enabled=enabled)


def _x(shape=(3, 5, K), seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _upstream(y):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(1))


def _layer_run(layer, names, fn, x, autocast):
    """Forward and backward (both inside the autocast region, as a CPU training loop may run them)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with _autocast(autocast):
        y = fn(x)
        (y.float() * _upstream(y)).sum().backward()
    return y.detach(), x.grad, lora_grads(layer, names)


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense", "nf4"])
def test_lora_linear_computes_like_peft_under_autocast(four_bit):
    """fp32 activations, base and adapters under bf16 autocast: PEFT's precision and output dtype (bf16 for a dense
    base, as F.linear; the input's for a 4-bit one, as bitsandbytes casts back), fp32 adapter gradients, and the
    tolerance rule against fp64 with PEFT's layer computed by PyTorch under autocast as the low-precision
    computation (a 4-bit base decoded: bitsandbytes' kernels compute in other orders on other CPUs)."""
    if four_bit:
        pytest.importorskip("bitsandbytes")
    # A 4-bit base computes through bitsandbytes' CPU dequantize in PEFT's layer, which misreads rows that are not
    # whole blocks on AVX-512 CPUs (tests/test_nf4.py): its rows are whole blocks of 64.
    k = 128 if four_bit else K
    layer, names = make_peft_lora_layer(k, N, ranks=(8, 4), bias=True, four_bit=four_bit)
    args = lora_args(layer)
    x = _x((3, 5, k))

    def ours(t):
        return fastlora.lora_linear(t, args.base, args.A, args.B, args.scaling, bias=args.bias,
                                    compute_dtype=args.compute_dtype)

    y_peft, dx_peft, g_peft = _layer_run(layer, names, layer, x, autocast=True)
    low = torch_twin(layer, torch.float32)
    y_low, dx_low, g_low = _layer_run(low, names, low, x, autocast=True)
    y, dx, g = _layer_run(layer, names, ours, x, autocast=True)
    assert y_peft.dtype == (torch.float32 if four_bit else BF16)
    assert y.dtype == y_peft.dtype and dx.dtype == dx_peft.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in (*g.values(), *g_peft.values()))

    weight = decode_nf4(args.base) if four_bit else args.base
    x64 = x.double().requires_grad_(True)
    a64 = [a.detach().double().requires_grad_(True) for a in args.A]
    b64 = [b.detach().double().requires_grad_(True) for b in args.B]
    y64 = lora_linear_reference(x64, weight.double(), a64, b64, args.scaling, bias=args.bias.double())
    (y64 * _upstream(y64).double()).sum().backward()
    assert_close_to_reference(y, y64, y_low, name="y")
    assert_close_to_reference(dx, x64.grad, dx_low, name="dx")
    for i, n in enumerate(names):
        assert_close_to_reference(g[f"A[{n}]"], a64[i].grad, g_low[f"A[{n}]"], ulps=2, name=f"dA[{n}]")
        assert_close_to_reference(g[f"B[{n}]"], b64[i].grad, g_low[f"B[{n}]"], ulps=2, name=f"dB[{n}]")


def _projections(dtype):
    """q, k, v and gate, up, down with fresh adapter leaves in ``dtype`` (the same values for every dtype)."""
    g = torch.Generator().manual_seed(0)

    def proj(k, n, r=4):
        w = torch.randn(n, k, generator=g) / k**0.5
        a, b = torch.randn(r, k, generator=g) / k**0.5, torch.randn(n, r, generator=g) * 0.3
        return fastlora.LoRAProjection(w.to(dtype), a.to(dtype).requires_grad_(True),
                                       b.to(dtype).requires_grad_(True), 2.0)

    return [proj(K, 32), proj(K, 16), proj(K, 16)], [proj(K, 24), proj(K, 24)], proj(24, K)


def _qkv(x, qkv, fused):
    if fused:
        return torch.cat(fastlora.lora_qkv(x, [p.base for p in qkv], [p.A for p in qkv], [p.B for p in qkv],
                                           [p.scaling for p in qkv]), dim=-1)
    return torch.cat([lora_linear_reference(x, p.base, [p.A], [p.B], [p.scaling]) for p in qkv], dim=-1)


def _mlp(x, gate_up, down, fused):
    return fastlora.lora_mlp(x, gate_up, down) if fused else lora_mlp_reference(x, gate_up, down)


@pytest.mark.parametrize("op", ["qkv", "mlp"])
def test_lora_qkv_and_mlp_under_autocast(op):
    """Both compute in the autocast dtype, with bf16 outputs as dense layers' are; within the rule against fp64,
    with the reference maths under autocast as the low-precision computation."""
    results = {}
    for label, fused, autocast, dtype in (("ours", True, True, torch.float32), ("torch", False, True, torch.float32),
                                          ("fp64", False, False, torch.float64)):
        qkv, gate_up, down = _projections(dtype)
        params = [t for p in (qkv if op == "qkv" else [*gate_up, down]) for t in (p.A, p.B)]
        x = _x().to(dtype).requires_grad_(True)
        with _autocast(autocast):
            y = _qkv(x, qkv, fused) if op == "qkv" else _mlp(x, gate_up, down, fused)
            (y.to(dtype) * _upstream(y).to(dtype)).sum().backward()
        results[label] = (y.detach(), x.grad, *(p.grad for p in params))
    assert results["ours"][0].dtype == BF16
    for i, (got, ref, low) in enumerate(zip(results["ours"], results["fp64"], results["torch"], strict=True)):
        assert got.dtype == low.dtype, i
        assert_close_to_reference(got, ref, low, ulps=2, name=f"{op} output {i}")


def test_nf4_matmul_and_fused_linear_cross_entropy_run_in_the_autocast_dtype():
    """Under autocast, fp32 inputs give what the same op gives on bf16 copies of them: exactly."""
    g = torch.Generator().manual_seed(3)
    w = fastlora.quantize_nf4(torch.randn(40, 64, generator=g))
    x, e1, e2 = torch.randn(5, 64, generator=g), torch.randn(5, 4, generator=g), torch.randn(40, 4, generator=g)
    with _autocast():
        y = nf4_matmul(x, w, e1=e1, e2=e2)
    assert y.dtype == BF16
    assert torch.equal(y, nf4_matmul(x.to(BF16), w, e1=e1.to(BF16), e2=e2.to(BF16)))

    hidden, weight = torch.randn(2, 7, 16, generator=g), torch.randn(33, 16, generator=g) / 4
    labels = torch.randint(0, 33, (2, 7), generator=g)
    results = []
    for autocast, dtype in ((True, torch.float32), (False, BF16)):
        h, wt = (t.detach().to(dtype).requires_grad_(True) for t in (hidden, weight))
        with _autocast(autocast):
            loss = fastlora.fused_linear_cross_entropy(h, wt, labels)
            loss.backward()
        assert h.grad.dtype == dtype and wt.grad.dtype == dtype
        results.append((loss, h.grad.to(BF16), wt.grad.to(BF16)))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_lora_linear_compiles_under_autocast():
    layer, _ = make_peft_lora_layer(K, N)
    args = lora_args(layer)

    def fn(x):
        with _autocast():
            return fastlora.lora_linear(x, args.base, args.A, args.B, args.scaling, bias=args.bias)

    x = _x()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), fn(x), rtol=0, atol=0)


@pytest.mark.parametrize(("four_bit", "backend"),
                         [(False, "auto"), (True, "auto"), (False, "torch"), (False, "triton")],
                         ids=["dense", "nf4", "dense-torch", "dense-triton"])
def test_patched_fp32_model_trains_under_autocast_like_the_unpatched(four_bit, backend, request):
    """The mixed-precision recipe (fp32 weights, bf16 autocast) on a Llama, dense or 4-bit. A forced backend also
    patches RoPE (left alone on a CPU otherwise), which then meets bf16 q and k with fp32 cos and sin."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastlora.testing import nf4_decoder

    if four_bit:
        pytest.importorskip("bitsandbytes")
    if backend == "triton":
        request.getfixturevalue("triton_device")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config)
    _like_the_unpatched_under_autocast(nf4_decoder(base) if four_bit else base, backend)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_family_trains_under_autocast_like_the_unpatched(model_type):
    import transformers

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    common.update(pad_token_id=0) if model_type == "phi3" else common.update(head_dim=16)
    if model_type in ("gemma2", "gemma3_text"):
        common["final_logit_softcapping"] = 30.0
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **common))
    _like_the_unpatched_under_autocast(base.float(), "auto")


def _like_the_unpatched_under_autocast(base, backend):
    """Over several batches: the patched model's LoRA gradients within twice the unpatched model's error against
    the fp64 model, and its loss the unpatched one's to within one bf16 epsilon (relative).

    The gradient errors are pooled normwise over every LoRA tensor and the batches: one tensor's largest element
    error is too noisy in bf16 (its patched/unpatched ratio spread over 1.1-2.5 across seeds, the normwise one over
    0.7-1.3), and so is one loss (its error against fp64 swings tenfold between batches for either model, and its
    pooled patched/unpatched ratio still reached 2 on Gemma over eight batches, 0.6 over twelve). A 2% error in the
    q/k/v LoRA scaling fails the gradient check (checked).

    The unpatched model is computed by PyTorch alone (a 4-bit base as the independent decoder reads it), as is the
    fp64 model: bitsandbytes' kernels compute in other orders on other CPUs, more or less accurately."""
    model = peft_lora_model(base)
    unpatched, exact = torch_twin(model, torch.float32), torch_twin(model)
    patched = copy.deepcopy(model)
    report = fastlora.patch(patched, backend=backend)
    assert any("apply_rope" in what for _, what in report.patched) == (backend != "auto")

    def run(model, ids, autocast):
        model.zero_grad(set_to_none=True)
        with _autocast(autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.double(), {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}

    squared = {"unpatched": 0.0, "patched": 0.0}  # gradient errors, squared and summed
    for seed in range(BATCHES):
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
        _, grads64 = run(exact, ids, False)
        losses = {}
        for name, model in (("unpatched", unpatched), ("patched", patched)):
            losses[name], grads = run(model, ids, True)
            assert grads.keys() == grads64.keys()
            squared[name] += sum(float(((grads[n] - grads64[n]) ** 2).sum()) for n in grads64)
        assert abs(losses["patched"] - losses["unpatched"]) <= 2.0**-8 * abs(losses["unpatched"]), losses
    got, bound = math.sqrt(squared["patched"]), 2 * math.sqrt(squared["unpatched"])
    assert got <= bound, f"LoRA gradients: patched error {got:.3e}, unpatched x2 {bound:.3e}"


def test_a_bad_compute_dtype_is_refused_under_autocast_too():
    layer, _ = make_peft_lora_layer(K, N)
    args = lora_args(layer)
    with _autocast(), pytest.raises(TypeError, match="compute_dtype"):
        fastlora.lora_linear(_x(), args.base, args.A, args.B, args.scaling, compute_dtype=torch.int8)
