import importlib

import pytest
import torch
import torch.nn.functional as F

import fastlora
from fastlora.dispatch import BackendUnavailableError
from fastlora.ops.swiglu import swiglu_backward_reference
from fastlora.testing import assert_close_to_reference

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (3, 7), (2, 5, 33), (1030,)]  # one element, odd sizes, one past a 1024 block


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    up = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return gate, up


def _check(backend, shape, dtype, device):
    gate, up = _inputs(shape, dtype, device)
    gate.requires_grad_(True)
    up.requires_grad_(True)
    y = fastlora.swiglu(gate, up, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)

    # The reference is fp64, so that fp32 kernels too are held to twice the error of PyTorch's own fp32 maths.
    g64, u64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    y64 = F.silu(g64) * u64
    y64.backward(dy.double())
    lowp = F.silu(gate.detach()) * up.detach()
    assert y.dtype == dtype
    assert_close_to_reference(y, y64, lowp, name=f"{backend} forward")

    dg_lowp, du_lowp = swiglu_backward_reference(dy, gate.detach(), up.detach())
    # PyTorch's own low-precision backward: autograd through silu * up in the input dtype.
    gl, ul = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)
    (F.silu(gl) * ul).backward(dy)
    assert_close_to_reference(gate.grad, g64.grad, gl.grad, name=f"{backend} d gate")
    assert_close_to_reference(up.grad, u64.grad, ul.grad, name=f"{backend} d up")
    # the reference backward itself rounds once from fp32
    assert_close_to_reference(dg_lowp, g64.grad, gl.grad, name="reference d gate")
    assert_close_to_reference(du_lowp, u64.grad, ul.grad, name="reference d up")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_backend(shape, dtype):
    _check("torch", shape, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_backend(shape, dtype):
    if ("swiglu", "cpu") not in fastlora.dispatch._native_kernels():
        pytest.skip(f"native extension unavailable: {fastlora._native.load_error()}")
    _check("cpp", shape, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_backend(shape, dtype, triton_device):
    _check("triton", shape, dtype, triton_device)


def test_auto_backend_non_contiguous_input(device):
    gate, up = _inputs((6, 10), torch.float32, device)
    gate_t, up_t = gate.t(), up.t()  # transposed views
    y = fastlora.swiglu(gate_t, up_t)
    assert_close_to_reference(y, F.silu(gate_t.double()) * up_t.double(), atol=1e-6)


def test_empty_input(device):
    gate, up = _inputs((0, 4), torch.float32, device)
    assert fastlora.swiglu(gate, up).shape == (0, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_needs_int64_offsets(dtype):
    n = 2**31 + 1024 + 7
    gate = torch.full((n,), 2.0, device="cuda", dtype=dtype)
    up = torch.ones((n,), device="cuda", dtype=dtype)
    y = fastlora.swiglu(gate, up, backend="triton")
    expected = (F.silu(torch.tensor(2.0)) * 1.0).to(dtype)
    assert (y[-8:] == expected.cuda()).all() and (y[:8] == expected.cuda()).all()


def test_bad_input_names_the_argument():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match="swiglu: up has shape"):
        fastlora.swiglu(g, torch.randn(4, 9))
    with pytest.raises(TypeError, match="swiglu: up has dtype"):
        fastlora.swiglu(g, torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="swiglu: gate has dtype torch.int64"):
        fastlora.swiglu(torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="swiglu: unknown backend 'fast'"):
        fastlora.swiglu(g, g, backend="fast")
    with pytest.raises(TypeError, match="swiglu: gate and up must be tensors"):
        fastlora.swiglu(g, [1.0])


def test_unavailable_backend_raises():
    g = torch.randn(4, 8)
    with pytest.raises(BackendUnavailableError, match="swiglu: backend cuda"):
        fastlora.swiglu(g, g, backend="cuda")


def test_use_backend_reaches_the_op(monkeypatch):
    calls = []
    mod = importlib.import_module("fastlora.ops.swiglu")  # the package exports a function of the same name

    real = mod.swiglu_reference
    monkeypatch.setattr(mod, "swiglu_reference", lambda g, u: calls.append(1) or real(g, u))
    g = torch.randn(4, 8)
    with fastlora.use_backend("torch"):
        fastlora.swiglu(g, g)
    assert calls == [1]


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_opcheck(backend, device):
    if backend == "cpp" and ("swiglu", "cpu") not in fastlora.dispatch._native_kernels():
        pytest.skip("native extension unavailable")
    if backend == "cpp" and device.type != "cpu":
        device = torch.device("cpu")
    if backend == "triton" and not fastlora.device_info(device).triton_usable:
        pytest.skip("Triton unusable here")
    gate, up = _inputs((3, 17), torch.float32, device)
    dy = torch.randn_like(gate)
    torch.library.opcheck(torch.ops.fastlora.swiglu_fwd.default, (gate, up, backend))
    torch.library.opcheck(torch.ops.fastlora.swiglu_bwd.default, (dy, gate, up, backend))


def test_opcheck_native_ops():
    if ("swiglu", "cpu") not in fastlora.dispatch._native_kernels():
        pytest.skip("native extension unavailable")
    gate, up = _inputs((3, 17), torch.bfloat16, "cpu")
    torch.library.opcheck(torch.ops.fastlora.native_swiglu_fwd.default, (gate, up, torch.empty_like(gate)))
    args = (torch.randn_like(gate), gate, up, torch.empty_like(gate), torch.empty_like(up))
    torch.library.opcheck(torch.ops.fastlora.native_swiglu_bwd.default, args)


def test_native_op_checks_its_arguments():
    if ("swiglu", "cpu") not in fastlora.dispatch._native_kernels():
        pytest.skip("native extension unavailable")
    gate, up = _inputs((3, 17), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="native_swiglu_fwd: out has shape"):
        torch.ops.fastlora.native_swiglu_fwd(gate, up, torch.empty(3, 16))
    with pytest.raises(RuntimeError, match="native_swiglu_fwd: up must be contiguous"):
        torch.ops.fastlora.native_swiglu_fwd(gate, torch.randn(17, 3).t(), torch.empty_like(gate))


def test_compile_fullgraph_forward_and_backward(device):
    gate, up = _inputs((4, 33), torch.float32, device)
    gate.requires_grad_(True)

    def f(g, u):
        return (fastlora.swiglu(g, u) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(gate, up)
    loss.backward()
    ref = gate.detach().clone().requires_grad_(True)
    f(ref, up).backward()
    torch.testing.assert_close(loss, f(ref.detach(), up))
    torch.testing.assert_close(gate.grad, ref.grad)


def test_compile_fullgraph_inductor(device):
    gate, up = _inputs((4, 33), torch.float32, device)
    compiled = torch.compile(lambda g, u: fastlora.swiglu(g, u) + 1, fullgraph=True)
    torch.testing.assert_close(compiled(gate, up), fastlora.swiglu(gate, up) + 1)
