"""fastlora.cross_entropy against torch.nn.functional.cross_entropy and transformers' ForCausalLMLoss."""

import pytest
import torch
import torch.nn.functional as F

import fastlora
from fastlora.ops.cross_entropy import cross_entropy_reference as _oracle
from fastlora.testing import assert_close_to_reference

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
B, S = 2, 5


def _inputs(vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, S, vocab, generator=g)).to(device, dtype)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    labels[0, 1] = labels[1, -1] = -100
    return logits, labels.to(device)


def _compare(backend, device, dtype, vocab, **options):
    logits, labels = _inputs(vocab, dtype, device)
    x64 = logits.detach().double().requires_grad_(True)
    xl = logits.detach().clone().requires_grad_(True)
    x = logits.detach().clone().requires_grad_(True)
    loss = fastlora.cross_entropy(x, labels, backend=backend, **options)
    ref, lowp = _oracle(x64, labels, **options), _oracle(xl, labels, **options)
    where = f"{backend} {dtype} V={vocab} {options}"
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert_close_to_reference(loss, ref, lowp.float(), ulps=4, atol=1e-5, name=f"{where} loss")
    g = torch.Generator().manual_seed(1)
    grad_out = torch.rand(ref.shape, generator=g, dtype=torch.float64).to(device) + 0.5
    (loss * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    (lowp * grad_out.to(lowp.dtype)).sum().backward()
    assert x.grad.dtype == dtype
    assert_close_to_reference(x.grad, x64.grad, xl.grad, name=f"{where} grad")


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 30.0 / 8},
    {"num_items_in_batch": 7},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 2.5, "reduction": "sum"},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_options_fp32(backend, options, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    _compare(backend, device, torch.float32, 97, **options)


@pytest.mark.parametrize("vocab", [1, 7, 4099])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dtypes_and_odd_vocabularies(dtype, vocab, triton_device):
    # 4099 > the largest chunk (4096): the online softmax runs over two chunks.
    _compare("triton", triton_device, dtype, vocab)
    _compare("triton", triton_device, dtype, vocab, label_smoothing=0.1, softcap=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_low_precision(dtype):
    _compare("torch", torch.device("cpu"), dtype, 33, z_loss=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [50257, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_vocabularies_gpu(vocab, dtype):
    _compare("triton", torch.device("cuda"), dtype, vocab)
    _compare("triton", torch.device("cuda"), dtype, vocab, num_items_in_batch=5, softcap=30.0)


@pytest.mark.parametrize("num_items", [None, 6, "tensor"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_equals_transformers_causal_lm_loss(backend, num_items, device):
    from transformers.loss.loss_utils import ForCausalLMLoss

    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    if num_items == "tensor":
        num_items = torch.tensor(6, device=device)
    vocab = 29
    logits, labels = _inputs(vocab, torch.bfloat16, device)
    hf_x = logits.detach().clone().requires_grad_(True)
    hf = ForCausalLMLoss(hf_x, labels, vocab, num_items_in_batch=num_items)
    hf.backward()
    # transformers shifts inside its loss; fastlora takes labels already shifted.
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    x = logits.detach().clone().requires_grad_(True)
    loss = fastlora.cross_entropy(x, shifted, num_items_in_batch=num_items, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, hf, rtol=1e-6, atol=1e-6)
    # transformers' gradient is fp32 rounded once to bf16; fastlora's too.
    torch.testing.assert_close(x.grad, hf_x.grad, rtol=0, atol=torch.finfo(torch.bfloat16).eps * hf_x.grad.abs().max())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_rows(backend, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    logits, labels = _inputs(11, torch.float32, device)
    labels[0] = -100  # a whole sequence ignored
    x = logits.clone().requires_grad_(True)
    fastlora.cross_entropy(x, labels, backend=backend).backward()
    assert torch.equal(x.grad[0], torch.zeros_like(x.grad[0])) and x.grad[1].abs().sum() > 0
    # Nothing valid at all: a mean is NaN as in torch, and no gradient reaches the logits; a sum is 0.
    none = torch.full_like(labels, -100)
    x = logits.clone().requires_grad_(True)
    loss = fastlora.cross_entropy(x, none, backend=backend)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits.view(-1, 11), none.view(-1)))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert fastlora.cross_entropy(logits, none, reduction="sum", backend=backend) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_label_out_of_range_is_nan_not_garbage(backend, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    logits, labels = _inputs(11, torch.float32, device)
    labels[1, 2] = 11
    rows = fastlora.cross_entropy(logits, labels, reduction="none", backend=backend)
    assert torch.isnan(rows[1, 2]) and torch.isfinite(rows[0]).all()
    # Its gradient row is NaN too (torch raises; no host sync here), the others stay finite.
    x = logits.detach().clone().requires_grad_(True)
    fastlora.cross_entropy(x, labels, reduction="sum", backend=backend).backward()
    assert torch.isnan(x.grad[1, 2]).all() and torch.isfinite(x.grad[0]).all() and torch.isfinite(x.grad[1, :2]).all()
    labels[1, 2] = -3
    assert torch.isnan(fastlora.cross_entropy(logits, labels, backend=backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_backward_reuses_the_logits(backend, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    logits, labels = _inputs(13, torch.float32, device)
    expected_leaf = logits.clone().requires_grad_(True)
    fastlora.cross_entropy(expected_leaf, labels, backend=backend).backward()

    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1  # a non-leaf, as a model's lm_head output is
    storage = x.data_ptr()
    loss = fastlora.cross_entropy(x, labels, inplace_backward=True, backend=backend)
    loss.backward()
    assert x.data_ptr() == storage
    torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=0, atol=0)

    # Declared to autograd: a graph that saved the logits before they were overwritten refuses to run.
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1
    saved = x * x
    fastlora.cross_entropy(x, labels, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_no_grad_writes_no_gradient():
    logits, labels = _inputs(13, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        loss = fastlora.cross_entropy(logits.requires_grad_(True), labels)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _oracle(logits.detach(), labels))


def test_second_backward_is_refused():
    logits, labels = _inputs(13, torch.float32, torch.device("cpu"))
    loss = fastlora.cross_entropy(logits.requires_grad_(True), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_non_contiguous_rows():
    logits, labels = _inputs(13, torch.float32, torch.device("cpu"))
    strided = logits[:, :4]  # rows not evenly strided as [N, V]
    torch.testing.assert_close(fastlora.cross_entropy(strided, labels[:, :4]), _oracle(strided, labels[:, :4]))
    padded = torch.randn(10, 16)[:, :13]  # rows contiguous, strided by 16: used without a copy
    torch.testing.assert_close(fastlora.cross_entropy(padded, labels.view(-1)), _oracle(padded, labels.view(-1)))
    with pytest.raises(ValueError, match="inplace_backward needs contiguous logits"):
        # an op's output in a transposed layout: not a view, not contiguous
        fastlora.cross_entropy(logits.requires_grad_(True).transpose(0, 1) * 1, labels.t(), inplace_backward=True)
    with pytest.raises(ValueError, match="cannot overwrite a view"):
        fastlora.cross_entropy((logits * 1)[:1], labels[:1], inplace_backward=True)


def test_bad_input_names_the_argument():
    logits, labels = _inputs(13, torch.float32, torch.device("cpu"))
    with pytest.raises(TypeError, match="logits has dtype torch.float64"):
        fastlora.cross_entropy(logits.double(), labels)
    with pytest.raises(ValueError, match="labels must be int64 or int32 of shape \\(2, 5\\)"):
        fastlora.cross_entropy(logits, labels[:, :3])
    with pytest.raises(ValueError, match="labels must be int64"):
        fastlora.cross_entropy(logits, labels.float())
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastlora.cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        fastlora.cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        fastlora.cross_entropy(logits, labels, z_loss=-1.0)
    with pytest.raises(ValueError, match="softcap must be positive"):
        fastlora.cross_entropy(logits, labels, softcap=0.0)
    with pytest.raises(ValueError, match="unknown backend 'cuda2'"):
        fastlora.cross_entropy(logits, labels, backend="cuda2")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, device):
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    logits, labels = _inputs(13, torch.float32, device)
    flat, flat_labels = logits.view(-1, 13), labels.view(-1)
    scale = torch.tensor(0.25, device=device)
    for softcap in (None, 3.0):
        args = (flat_labels, scale, -100, 0.1, 1e-3, softcap)
        torch.library.opcheck(torch.ops.fastlora.cross_entropy_fwd.default, (flat, *args, True, backend))
        torch.library.opcheck(torch.ops.fastlora.cross_entropy_fwd.default, (flat, *args, False, backend))
        torch.library.opcheck(torch.ops.fastlora.cross_entropy_fwd_.default, (flat.clone(), *args, backend))


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph(inplace, device):
    logits, labels = _inputs(13, torch.float32, device)

    def f(leaf, labels):
        return fastlora.cross_entropy(leaf * 2, labels, inplace_backward=inplace, label_smoothing=0.1)

    leaf = logits.clone().requires_grad_(True)
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(leaf, labels)
    loss.backward()
    ref_leaf = logits.clone().requires_grad_(True)
    ref = f(ref_leaf, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad)


def test_benchmark_suite_gates_every_provider(monkeypatch):
    from fastlora.benchmarks import harness, timing
    from fastlora.benchmarks.suites import SUITES

    monkeypatch.setitem(timing.CPU_BUDGET_S, True, 0.005)
    results = {(r.provider, r.mode): r for r in harness.run_suite(SUITES["cross_entropy"], torch.device("cpu"),
                                                                  quick=True, dtype=torch.float32)}
    for key in [("torch", "forward"), ("fastlora", "forward"), ("torch", "full"), ("fastlora", "full")]:
        assert results[key].status == "ok", (key, results[key].reason)
    assert results[("fastlora", "full")].max_error < 1e-5


@pytest.mark.parametrize("op", ["cross_entropy", "fused_linear_cross_entropy"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softcap_keeps_small_logits_accurate(backend, op, device):
    # |x| << softcap: tanh computed as 1 - 2 / (exp(2u) + 1) cancels there (3.5e-6 absolute error in the capped
    # logits at c = 30 against torch.tanh's 4e-7), which the default atol of the tests above hides.
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    g = torch.Generator().manual_seed(0)
    n, vocab, softcap = 16, 64, 30.0
    logits = torch.randn(n, vocab, generator=g).to(device)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    # An identity lm_head makes the fused op's logits the inputs themselves, exactly.
    eye = torch.eye(vocab, device=device)
    for reduction in ("none", "mean"):
        x64, xl, x = (logits.clone().to(dt).requires_grad_(True) for dt in (torch.float64, torch.float32,
                                                                              torch.float32))
        if op == "cross_entropy":
            loss = fastlora.cross_entropy(x, labels, softcap=softcap, reduction=reduction, backend=backend)
        else:
            loss = fastlora.fused_linear_cross_entropy(x, eye, labels, softcap=softcap, reduction=reduction,
                                                       backend=backend)
        ref = _oracle(x64, labels, softcap=softcap, reduction=reduction)
        lowp = _oracle(xl, labels, softcap=softcap, reduction=reduction)
        where = f"{op} {backend} softcap={softcap} reduction={reduction}"
        assert_close_to_reference(loss, ref, lowp, atol=1e-8, name=f"{where} loss")
        grad_out = torch.rand(ref.shape, generator=g, dtype=torch.float64).to(device) + 0.5
        (loss * grad_out).sum().backward()
        (ref * grad_out).sum().backward()
        (lowp * grad_out.float()).sum().backward()
        assert_close_to_reference(x.grad, x64.grad, xl.grad, atol=1e-10, name=f"{where} grad")


def test_validate_raises_like_torch_for_a_label_out_of_range():
    """validate=True reads the labels (a host sync, opt-in) and names the first one out of range, as torch raises;
    ignore_index and labels in range pass."""
    logits = torch.randn(2, 3, 11)
    labels = torch.tensor([[1, -100, 10], [0, 11, 2]])
    with pytest.raises(ValueError, match=r"cross_entropy: label 11 at \(1, 1\) is outside \[0, 11\)"):
        fastlora.cross_entropy(logits, labels, validate=True)
    with pytest.raises(IndexError):  # what torch does with the same labels
        torch.nn.functional.cross_entropy(logits.view(-1, 11), labels.view(-1))
    labels[1, 1] = 3
    torch.testing.assert_close(fastlora.cross_entropy(logits, labels, validate=True),
                               torch.nn.functional.cross_entropy(logits.view(-1, 11), labels.view(-1)))
    hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
    labels[0, 0] = -7
    with pytest.raises(ValueError, match=r"fused_linear_cross_entropy: label -7 at \(0, 0\)"):
        fastlora.fused_linear_cross_entropy(hidden, weight, labels, validate=True)
