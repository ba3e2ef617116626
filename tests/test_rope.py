"""apply_rope against transformers' own apply_rotary_pos_emb, with cos/sin from the families' rotary embeddings."""

import importlib

import pytest
import torch

import fastlora
from fastlora.testing import assert_close_to_reference

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
B, S, HQ, HK, D = 2, 7, 4, 2, 16


def _rotary(family: str):
    """(cos, sin) from the family's rotary embedding, and the family's apply_rotary_pos_emb."""
    from transformers import LlamaConfig, Phi3Config, Qwen3Config

    common = dict(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HK, head_dim=D,
                  intermediate_size=64, num_hidden_layers=1, vocab_size=97, max_position_embeddings=4)
    configs = {
        "llama": ("llama", LlamaConfig(**common)),
        "llama3": ("llama", LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 2})),
        "linear": ("llama", LlamaConfig(**common, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                    "factor": 2.0})),
        "dynamic": ("llama", LlamaConfig(**common, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                     "factor": 2.0})),
        "qwen3": ("qwen3", Qwen3Config(**common)),
        "phi3": ("phi3", Phi3Config(**{k: v for k, v in common.items() if k != "head_dim"},
                                    partial_rotary_factor=0.5, pad_token_id=0)),
    }
    module_name, config = configs[family]
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    rotary_cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    rotary = rotary_cls(config)
    # Different positions per batch row (as with left padding), past max_position_embeddings for dynamic.
    position_ids = torch.stack([torch.arange(S), torch.arange(S) + 3])
    cos, sin = rotary(torch.zeros(B, S, HQ * D), position_ids)
    return cos, sin, module.apply_rotary_pos_emb


def _qk(dtype, layout="bhsd", seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = torch.randn(B, S, HQ, D, generator=g).to(dtype)  # what the projection's view gives
    ks = torch.randn(B, S, HK, D, generator=g).to(dtype)
    if layout == "bhsd":
        return qs.transpose(1, 2), ks.transpose(1, 2)  # HF's non-contiguous [B, H, S, D] views
    return qs, ks


def _compare(backend, family, dtype, device, layout="bhsd", inplace=False):
    cos, sin, hf_apply = _rotary(family)
    unsqueeze_dim = 1 if layout == "bhsd" else 2
    q, k = (t.to(device) for t in _qk(dtype, layout))
    cos, sin = cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)
    q64, k64 = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    rq64, rk64 = hf_apply(q64, k64, cos.double(), sin.double(), unsqueeze_dim=unsqueeze_dim)
    ql, kl = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    rql, rkl = hf_apply(ql, kl, cos, sin, unsqueeze_dim=unsqueeze_dim)

    leaf_q, leaf_k = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    # In place needs non-leaf inputs: rotate a copy made inside the graph, as a model's projection output is.
    qin, kin = (leaf_q * 1, leaf_k * 1) if inplace else (leaf_q, leaf_k)
    oq, ok = fastlora.apply_rope(qin, kin, cos, sin, unsqueeze_dim=unsqueeze_dim, inplace=inplace,
                                 backend=backend)
    if inplace:
        assert oq is qin and ok is kin
    where = f"{backend} {family} {dtype} {layout}{' inplace' if inplace else ''}"
    assert oq.shape == q.shape and ok.shape == k.shape and oq.dtype == dtype
    assert_close_to_reference(oq, rq64, rql, name=f"{where} q")
    assert_close_to_reference(ok, rk64, rkl, name=f"{where} k")

    g = torch.Generator().manual_seed(1)
    gq, gk = torch.randn(oq.shape, generator=g).to(device, dtype), torch.randn(ok.shape, generator=g).to(device, dtype)
    (oq.float() * gq.float()).sum().add((ok.float() * gk.float()).sum()).backward()
    (rq64 * gq.double()).sum().add((rk64 * gk.double()).sum()).backward()
    (rql.float() * gq.float()).sum().add((rkl.float() * gk.float()).sum()).backward()
    assert_close_to_reference(leaf_q.grad, q64.grad, ql.grad, name=f"{where} dq")
    assert_close_to_reference(leaf_k.grad, k64.grad, kl.grad, name=f"{where} dk")


FAMILIES = ["llama", "llama3", "linear", "dynamic", "qwen3", "phi3"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_backend(family, dtype):
    _compare("torch", family, dtype, torch.device("cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend(family, dtype, triton_device):
    _compare("triton", family, dtype, triton_device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_bshd_layout_and_inplace(backend, family, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    _compare(backend, family, torch.bfloat16, device, layout="bshd")
    _compare(backend, family, torch.float32, device, inplace=True)


def test_cos_and_sin_are_derived_from_rope_parameters():
    """The rope types really give different cos/sin, so the tests above cover different inputs."""
    cos = {f: _rotary(f)[0] for f in ("llama", "llama3", "linear", "dynamic")}
    for a in cos:
        for b in cos:
            if a < b:
                assert not torch.allclose(cos[a], cos[b]), (a, b)
    assert _rotary("phi3")[0].shape[-1] == D // 2


def test_inplace_writes_into_the_views(device):
    q, k = (t.to(device) for t in _qk(torch.float32))
    cos, sin, _ = _rotary("llama")
    expected_q, expected_k = fastlora.apply_rope(q, k, cos.to(device), sin.to(device))
    storage = q.data_ptr()
    fastlora.apply_rope(q, k, cos.to(device), sin.to(device), inplace=True)
    assert q.data_ptr() == storage
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)


def test_output_keeps_the_input_layout():
    q, k = _qk(torch.float32)
    cos, sin, _ = _rotary("llama")
    oq, ok = fastlora.apply_rope(q, k, cos, sin, backend="torch")
    assert oq.stride() == q.stride() and ok.stride() == k.stride()


def test_bad_input_names_the_argument():
    q, k = _qk(torch.float32)
    cos, sin, _ = _rotary("llama")
    with pytest.raises(TypeError, match="position_ids is unused"):
        fastlora.apply_rope(q, k, cos, sin, 2)
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        fastlora.apply_rope(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match="k has shape"):
        fastlora.apply_rope(q, k[:, :, :3], cos, sin)
    with pytest.raises(ValueError, match="cos and sin must be"):
        fastlora.apply_rope(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="rotary size R = cos.shape\\[-1\\] = 17"):
        fastlora.apply_rope(q, k, torch.ones(1, S, 17), torch.ones(1, S, 17))
    with pytest.raises(TypeError, match="q and k must share"):
        fastlora.apply_rope(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="no gradient flows to them"):
        fastlora.apply_rope(q, k, cos.requires_grad_(True), sin)
    with pytest.raises(ValueError, match="unknown backend 'cuda2'"):
        fastlora.apply_rope(q, k, cos.detach(), sin, backend="cuda2")
    with pytest.raises(ValueError, match="inplace needs q and k with a contiguous last dimension"):
        fastlora.apply_rope(q.transpose(2, 3).contiguous().transpose(2, 3), k, cos.detach(), sin, inplace=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    q, k = (t.to(device) for t in _qk(torch.float32))
    cos, sin, _ = _rotary("phi3")
    cos, sin = cos.to(device), sin.to(device)
    torch.library.opcheck(torch.ops.fastlora.rope.default, (q, k, cos, sin, 1, False, backend))
    torch.library.opcheck(torch.ops.fastlora.rope_.default, (q.clone(), k.clone(), cos, sin, 1, True, backend))


def test_compile_fullgraph(device):
    q, k = (t.to(device) for t in _qk(torch.float32))
    cos, sin, _ = _rotary("llama")
    cos, sin = cos.to(device), sin.to(device)
    q.requires_grad_(True)

    def f(q, k):
        oq, ok = fastlora.apply_rope(q, k, cos, sin)
        return oq.sum() + (ok * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k)
    loss.backward()
    ref = q.detach().clone().requires_grad_(True)
    f(ref, k).backward()
    torch.testing.assert_close(q.grad, ref.grad)


def test_benchmark_suite_gates_every_provider(monkeypatch):
    from fastlora.benchmarks import harness, timing
    from fastlora.benchmarks.suites import SUITES

    monkeypatch.setitem(timing.CPU_BUDGET_S, True, 0.005)
    results = {(r.provider, r.mode): r for r in harness.run_suite(SUITES["rope"], torch.device("cpu"), quick=True,
                                                                  dtype=torch.float32)}
    for key in [("torch", "forward"), ("fastlora", "forward"), ("fastlora", "backward"), ("fastlora", "full"),
                ("fastlora-inplace", "forward")]:
        assert results[key].status == "ok", (key, results[key].reason)
        assert results[key].max_error is None or results[key].max_error < 1e-5
    assert results[("fastlora-inplace", "backward")].status == "skipped"


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize(("dtype", "cos_dtype"), [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                  (torch.float32, torch.bfloat16)], ids=["bf16-fp32", "fp16-fp32",
                                                                                           "fp32-bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_dtype_promotes_as_transformers_does(backend, dtype, cos_dtype, family, device):
    """transformers' q * cos + rotate_half(q) * sin promotes (bf16 q and k with fp32 cos and sin, as under
    autocast, give fp32): a drop-in returns that dtype, while the gradients keep q's and k's."""
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    cos, sin, hf_apply = _rotary(family)
    cos, sin = cos.to(device, cos_dtype), sin.to(device, cos_dtype)
    q, k = (t.to(device) for t in _qk(dtype))
    leaf_q, leaf_k, ql, kl = (t.detach().clone().requires_grad_(True) for t in (q, k, q, k))
    q64, k64 = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    oq, ok = fastlora.apply_rope(leaf_q, leaf_k, cos, sin, backend=backend)
    rql, rkl = hf_apply(ql, kl, cos, sin)
    rq64, rk64 = hf_apply(q64, k64, cos.double(), sin.double())
    where = f"{backend} {family} q {dtype} cos {cos_dtype}"
    assert (oq.dtype, ok.dtype) == (rql.dtype, rkl.dtype) == (torch.promote_types(dtype, cos_dtype),) * 2, where
    assert_close_to_reference(oq, rq64, rql, name=f"{where} q")
    assert_close_to_reference(ok, rk64, rkl, name=f"{where} k")

    g = torch.Generator().manual_seed(1)
    gq, gk = torch.randn(oq.shape, generator=g).to(device), torch.randn(ok.shape, generator=g).to(device)
    for outs in ((oq, ok), (rql, rkl), (rq64, rk64)):
        (outs[0] * gq.to(outs[0].dtype)).sum().add((outs[1] * gk.to(outs[1].dtype)).sum()).backward()
    assert leaf_q.grad.dtype == leaf_k.grad.dtype == ql.grad.dtype == dtype
    assert_close_to_reference(leaf_q.grad, q64.grad, ql.grad, name=f"{where} dq")
    assert_close_to_reference(leaf_k.grad, k64.grad, kl.grad, name=f"{where} dk")

    # In place, q and k keep their dtype, as torch's in-place ops (q.mul_(cos)) do.
    qi, ki = (t.detach().clone() for t in (q, k))
    assert fastlora.apply_rope(qi, ki, cos, sin, inplace=True, backend=backend)[0] is qi and qi.dtype == dtype
    assert_close_to_reference(qi, rq64, rql.to(dtype), name=f"{where} q in place")


def test_cos_and_sin_of_another_kind_are_refused():
    q, k = _qk(torch.float32)
    cos, sin, _ = _rotary("llama")
    with pytest.raises(TypeError, match="apply_rope: cos must be float32, float16 or bfloat16, got torch.float64"):
        fastlora.apply_rope(q, k, cos.double(), sin)
