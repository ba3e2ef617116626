"""fastlora.fused_linear_cross_entropy against the unfused loss (F.linear then cross-entropy) in fp64."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora.ops.cross_entropy import cross_entropy_reference
from fastlora.ops.linear_cross_entropy import chunk_rows, linear_cross_entropy_reference
from fastlora.testing import assert_close_to_reference

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
B, S, H = 2, 7, 16


def _inputs(vocab, dtype, device, *, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, H, generator=g) / H**0.5 * 3).to(device, dtype)
    b = torch.randn(vocab, generator=g).to(device, dtype) if bias else None
    labels = torch.randint(0, vocab, (B, S), generator=g)
    labels[0, :3] = -100
    return hidden, weight, b, labels.to(device)


def _leaves(tensors, dtype, grads):
    pairs = zip(tensors, grads, strict=True)
    return [None if t is None else t.detach().to(dtype).requires_grad_(need) for t, need in pairs]


def _compare(backend, device, dtype, vocab, *, bias=False, train_weight=True, chunk_tokens=5, **options):
    hidden, weight, b, labels = _inputs(vocab, dtype, device, bias=bias)
    grads = (True, train_weight, True)
    h, w, bb = _leaves((hidden, weight, b), dtype, grads)
    h64, w64, b64 = _leaves((hidden, weight, b), torch.float64, grads)
    hl, wl, bl = _leaves((hidden, weight, b), dtype, grads)
    # A budget of chunk_tokens rows of logits: several chunks, the last one partial.
    loss = fastlora.fused_linear_cross_entropy(h, w, labels, bias=bb, backend=backend,
                                               max_chunk_bytes=chunk_tokens * vocab * h.element_size(), **options)
    ref = linear_cross_entropy_reference(h64, w64, labels, b64, **options)
    # torch in low precision: the logits GEMM in the low dtype, the loss upcast as transformers does.
    lowp = cross_entropy_reference(torch.nn.functional.linear(hl, wl, bl).float(), labels,
                                                     **options)
    where = f"{backend} {dtype} V={vocab} bias={bias} train_weight={train_weight} {options}"
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_close_to_reference(loss, ref, lowp, ulps=4, atol=1e-5, name=f"{where} loss")
    g = torch.Generator().manual_seed(1)
    grad_out = torch.rand(ref.shape, generator=g, dtype=torch.float64).to(device) + 0.5
    (loss * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    (lowp * grad_out.float()).sum().backward()
    assert_close_to_reference(h.grad, h64.grad, hl.grad, name=f"{where} d_hidden")
    if train_weight:
        assert_close_to_reference(w.grad, w64.grad, wl.grad, name=f"{where} d_weight")
    else:
        assert w.grad is None
    if bias:
        assert_close_to_reference(bb.grad, b64.grad, bl.grad, name=f"{where} d_bias")


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"num_items_in_batch": 9},
    {"label_smoothing": 0.1, "z_loss": 1e-3},
    {"softcap": 2.5},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_options_fp32(backend, options, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    _compare(backend, device, torch.float32, 37, bias=True, **options)


@pytest.mark.parametrize("train_weight", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dtypes(dtype, train_weight, triton_device):
    _compare("triton", triton_device, dtype, 37, train_weight=train_weight)
    _compare("triton", triton_device, dtype, 37, train_weight=train_weight, reduction="none", bias=True)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 14, 100])
def test_chunkings_agree(chunk_tokens):
    _compare("torch", torch.device("cpu"), torch.float32, 11, chunk_tokens=chunk_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [50257, 128256])
def test_large_vocabularies_gpu(vocab):
    _compare("triton", torch.device("cuda"), torch.bfloat16, vocab, train_weight=False, chunk_tokens=4)
    _compare("triton", torch.device("cuda"), torch.bfloat16, vocab, softcap=30.0, num_items_in_batch=9)


class _LargestAllocation(TorchDispatchMode):
    """The most elements any op produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_logits_and_skips_frozen_weight_work():
    vocab = 97
    hidden, weight, _, labels = _inputs(vocab, torch.float32, torch.device("cpu"))
    h = hidden.requires_grad_(True)
    with _LargestAllocation() as mode:
        loss = fastlora.fused_linear_cross_entropy(h, weight, labels, max_chunk_bytes=4 * vocab * 4, backend="torch")
        loss.backward()
    # The largest tensors are [V, H] and [N, H] = 1552 and 224 elements; a chunk is [4, V] = 388; logits would be
    # [N, V] = 1358.
    assert mode.largest <= 4 * vocab, mode.largest
    assert weight.grad is None
    rows, d_hidden, d_weight, d_bias = torch.ops.fastlora.fused_linear_cross_entropy(
        h.detach().view(-1, H), weight, None, labels.view(-1), torch.ones(()), -100, 0.0, 0.0, None, True, False,
        False, 1 << 20, "torch")
    assert d_hidden.shape == (B * S, H) and d_weight.numel() == 0 and d_bias.numel() == 0


def test_chunk_rows():
    assert chunk_rows(8192, 128256, 2, 256 * 2**20) == 1024  # 1046 rows fit, rounded to whole 128-row tiles
    assert chunk_rows(100, 128256, 2, 256 * 2**20) == 100
    assert chunk_rows(100, 1000, 4, 10) == 1  # at least one row, whatever the budget
    assert chunk_rows(100, 10, 4, 200) == 5


def test_no_grad_and_second_backward():
    hidden, weight, _, labels = _inputs(11, torch.float32, torch.device("cpu"))
    expected = linear_cross_entropy_reference(hidden, weight, labels)
    with torch.no_grad():
        torch.testing.assert_close(fastlora.fused_linear_cross_entropy(hidden.requires_grad_(True), weight, labels),
                                   expected)
    loss = fastlora.fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_bad_input_names_the_argument():
    hidden, weight, _, labels = _inputs(11, torch.float32, torch.device("cpu"))
    flce = fastlora.fused_linear_cross_entropy
    with pytest.raises(TypeError, match="weight \\(torch.bfloat16\\) and bias must have hidden's dtype"):
        flce(hidden, weight.bfloat16(), labels)
    with pytest.raises(ValueError, match="weight must be \\[V, 16\\]"):
        flce(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="bias must be \\[11\\]"):
        flce(hidden, weight, labels, bias=torch.zeros(5))
    with pytest.raises(ValueError, match="labels must be int64 or int32 of shape \\(2, 7\\)"):
        flce(hidden, weight, labels[:1])
    with pytest.raises(ValueError, match="max_chunk_bytes must be a positive int"):
        flce(hidden, weight, labels, max_chunk_bytes=0)
    with pytest.raises(ValueError, match="fused_linear_cross_entropy: reduction must be one of"):
        flce(hidden, weight, labels, reduction="avg")
    with pytest.raises(TypeError, match="hidden has dtype torch.float64"):
        flce(hidden.double(), weight.double(), labels)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    hidden, weight, b, labels = _inputs(11, torch.float32, device, bias=True)
    flat, flat_labels = hidden.view(-1, H), labels.view(-1)
    for scale, softcap in ((torch.tensor(0.5, device=device), None), (torch.rand(B * S, device=device), 3.0)):
        for bias, needs in ((b, (True, True, True)), (None, (True, False, False)), (None, (False, False, False))):
            args = (flat, weight, bias, flat_labels, scale, -100, 0.1, 1e-3, softcap, *needs, 5 * 11 * 4, backend)
            torch.library.opcheck(torch.ops.fastlora.fused_linear_cross_entropy.default, args)


def test_compile_fullgraph(device):
    hidden, weight, b, labels = _inputs(11, torch.float32, device, bias=True)

    def f(h, w, bias):
        return fastlora.fused_linear_cross_entropy(h * 2, w, labels, bias=bias, max_chunk_bytes=5 * 11 * 4)

    leaves = _leaves((hidden, weight, b), torch.float32, (True, True, True))
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    ref_leaves = _leaves((hidden, weight, b), torch.float32, (True, True, True))
    ref = f(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_benchmark_suite_gates_every_provider(monkeypatch):
    from fastlora.benchmarks import harness, timing
    from fastlora.benchmarks.suites import SUITES

    monkeypatch.setitem(timing.CPU_BUDGET_S, True, 0.005)
    suite = SUITES["fused_linear_cross_entropy"]
    results = {(r.provider, r.mode): r for r in harness.run_suite(suite, torch.device("cpu"), quick=True,
                                                                  dtype=torch.float32)}
    for key in [("torch", "forward"), ("fastlora", "forward"), ("fastlora", "full"), ("matmuls", "full")]:
        assert results[key].status == "ok", (key, results[key].reason)
    assert results[("fastlora", "full")].max_error < 1e-4
    assert results[("matmuls", "full")].max_error is None  # a floor is timed, not gated


def test_a_label_out_of_range_makes_its_row_nan_not_garbage():
    """As fastlora.cross_entropy: the loss and that token's hidden gradient are NaN (no host sync to raise), the
    other tokens' gradients finite."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=g).requires_grad_(True)
    weight = torch.randn(11, 8, generator=g)
    labels = torch.tensor([1, 2, 11, 3, -100, 4])
    loss = fastlora.fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(hidden.grad[2]).all()
    assert torch.isfinite(hidden.grad[[0, 1, 3, 5]]).all() and torch.equal(hidden.grad[4], torch.zeros(8))
