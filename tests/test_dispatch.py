import logging

import pytest
import torch

from fastlora import dispatch
from fastlora.dispatch import Backend, BackendUnavailableError, plan, policies, resolve_backend, use_backend
from fastlora.testing import SIMULATED_DEVICES

T, CU, CPP, TORCH = Backend.TRITON, Backend.CUDA, Backend.CPP, Backend.TORCH
bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

# A native build with every kernel it could have, and one with none (a failed build).
NATIVE_ALL = frozenset((op, dev) for op in ("swiglu", "nf4_dequantize", "fake_op") for dev in ("cpu", "cuda"))
NATIVE_NONE: frozenset = frozenset()

# What each simulated machine must choose for every op in the table, at its recommended dtype, with the
# native extension built. A new op adds its column here.
EXPECTED = {
    "h100": (bf16, {"swiglu": T, "nf4_dequantize": T, "rope": T, "cross_entropy": T, "nf4_matmul": T, "glu": T}),
    "a100": (bf16, {"swiglu": T, "nf4_dequantize": T, "rope": T, "cross_entropy": T, "nf4_matmul": T, "glu": T}),
    # nf4_matmul's tl.dot has no tensor cores on sm_75 in Triton 3.9 (an FMA loop that spills): dequantize + cuBLAS
    "t4": (fp16, {"swiglu": T, "nf4_dequantize": T, "rope": T, "cross_entropy": T, "nf4_matmul": TORCH, "glu": T}),
    # Triton skips Volta: the CUDA extension where the op has one, else the reference
    "v100": (fp16, {"swiglu": TORCH, "nf4_dequantize": CU, "rope": TORCH, "cross_entropy": TORCH,
                    "nf4_matmul": TORCH, "glu": TORCH}),
    "mi300x": (bf16, {"swiglu": T, "nf4_dequantize": T, "rope": T, "cross_entropy": T, "nf4_matmul": T, "glu": T}),
    "cpu": (fp32, {"swiglu": CPP, "nf4_dequantize": CPP, "rope": TORCH, "cross_entropy": TORCH,
                   "nf4_matmul": TORCH, "glu": TORCH}),
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for var in list(__import__("os").environ):
        if var.startswith("FASTLORA_BACKEND"):
            monkeypatch.delenv(var)


@pytest.fixture
def fake_op():
    """An op with every kind of backend, to exercise the rules the real table does not reach yet."""
    dispatch.register_op("fake_op", [T, CU, CPP, TORCH])
    yield "fake_op"
    dispatch.unregister_op("fake_op")


def test_expectations_cover_every_op():
    for device, (_, ops) in EXPECTED.items():
        assert set(ops) == set(policies()), f"{device}: expectations must name every op in the policy table"


@pytest.mark.parametrize("device", sorted(EXPECTED))
def test_every_op_on_simulated_devices(device):
    info = SIMULATED_DEVICES[device]
    dtype, ops = EXPECTED[device]
    assert info.compute_dtype == dtype
    decisions = {d.op: d for d in plan(info, native=NATIVE_ALL)}
    for op, backend in ops.items():
        assert decisions[op].backend is backend, f"{device}/{op}: {decisions[op]}"
        assert decisions[op].dtype == dtype


@pytest.mark.parametrize("device, native, expected", [
    ("h100", NATIVE_ALL, T),
    ("a100", NATIVE_ALL, T),
    ("t4", NATIVE_ALL, T),
    ("v100", NATIVE_ALL, CU),  # Volta: the CUDA extension where the op has one...
    ("v100", NATIVE_NONE, TORCH),  # ...else the reference
    ("mi300x", NATIVE_ALL, T),  # ROCm: Triton, never the CUDA extension
    ("cpu", NATIVE_ALL, CPP),
    ("cpu", NATIVE_NONE, TORCH),
])
def test_full_candidate_list(fake_op, device, native, expected):
    info = SIMULATED_DEVICES[device]
    backend, reason = resolve_backend(fake_op, info, info.compute_dtype, native=native)
    assert backend is expected
    assert reason.startswith(expected.value)


def test_rocm_never_takes_cuda_extension(fake_op):
    info = SIMULATED_DEVICES["mi300x"].replace(triton_usable=False, triton_reason="no triton")
    assert resolve_backend(fake_op, info, bf16, native=NATIVE_ALL)[0] is TORCH
    with pytest.raises(BackendUnavailableError, match="fake_op.*cuda.*NVIDIA"):
        resolve_backend(fake_op, info, bf16, "cuda", native=NATIVE_ALL)


def test_turing_has_no_triton_bf16():
    t4 = SIMULATED_DEVICES["t4"]
    d = dispatch.decide("swiglu", t4, bf16, native=NATIVE_ALL)
    assert d.backend is TORCH
    assert d.rejected[0][0] is T and "bf16" in d.rejected[0][1]
    with pytest.raises(BackendUnavailableError, match="swiglu.*triton.*bf16"):
        resolve_backend("swiglu", t4, bf16, "triton", native=NATIVE_ALL)


def test_h100_without_triton_falls_back_to_cuda_extension(fake_op):
    info = SIMULATED_DEVICES["h100"].replace(triton_usable=False, triton_reason="triton cannot be imported")
    d = dispatch.decide(fake_op, info, bf16, native=NATIVE_ALL)
    assert d.backend is CU
    assert d.rejected == ((T, "triton cannot be imported"),)


def test_cpu_auto_skips_interpreter_but_explicit_triton_may_use_it():
    cpu = SIMULATED_DEVICES["cpu"].replace(triton_usable=True, triton_reason="interpreter")
    assert resolve_backend("swiglu", cpu, fp32, native=NATIVE_NONE)[0] is TORCH
    assert resolve_backend("swiglu", cpu, fp32, "triton", native=NATIVE_NONE)[0] is T


@pytest.mark.parametrize(("flags", "native_bf16"), [
    ({"avx2", "fma"}, False),                                    # an older x86-64 CPU
    ({"avx2", "fma", "avx512f"}, False),                         # AVX-512 without its bf16 instructions
    ({"avx2", "fma", "avx512f", "avx512_bf16"}, True),           # an AMD EPYC (Zen 4)
    ({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}, True),  # an Intel Xeon with AMX
])
def test_every_cpu_computes_in_fp32_unless_asked(monkeypatch, flags, native_bf16):
    """The CPU policy: fp32 on every CPU, whatever its bf16 instructions, which are reported (bf16 is a choice
    the user makes, such as ``--dtype bfloat16``)."""
    import fastlora.device as device
    from fastlora.env import format_report

    monkeypatch.setattr(device, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(device, "_TORCH_CPU_PROBES", {})  # this CPU's CPUID must not filter the simulated one's
    info = device._probe_cpu({})
    assert info.compute_dtype == fp32 == device.CPU_COMPUTE_DTYPE
    assert info.bf16 == native_bf16 and info.cpu_features <= flags
    assert resolve_backend("swiglu", info, native=NATIVE_NONE)[0] is TORCH  # at the default dtype, fp32
    report = {"fastlora": "x", "python": "3", "platform": "p", "device": info.to_dict(), "native": {"loaded": "x"},
              "ops": [], "checks": [], "warnings": [], "errors": []}
    text = format_report({**report, "ok": True})
    assert "recommended dtype float32 (fastlora's CPU default" in text
    assert ("--dtype bfloat16" in text) == native_bf16


def test_explicit_request_that_cannot_run_names_op_backend_and_why():
    with pytest.raises(BackendUnavailableError) as e:
        resolve_backend("swiglu", SIMULATED_DEVICES["h100"], bf16, "cpp", native=NATIVE_ALL)
    msg = str(e.value)
    assert "swiglu" in msg and "cpp" in msg and "requested by the caller" in msg and "CPU" in msg


def test_request_for_backend_the_op_lacks():
    with pytest.raises(BackendUnavailableError, match="swiglu has no cuda implementation"):
        resolve_backend("swiglu", SIMULATED_DEVICES["v100"], fp16, "cuda", native=NATIVE_ALL)


def test_global_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    backend, reason = resolve_backend("swiglu", SIMULATED_DEVICES["h100"], bf16, native=NATIVE_ALL)
    assert backend is TORCH and "FASTLORA_BACKEND=torch" in reason


def test_per_op_variable_beats_global(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    monkeypatch.setenv("FASTLORA_BACKEND_SWIGLU", "triton")
    assert resolve_backend("swiglu", SIMULATED_DEVICES["h100"], bf16, native=NATIVE_ALL)[0] is T


def test_environment_request_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND_SWIGLU", "cpp")
    with pytest.raises(BackendUnavailableError, match="FASTLORA_BACKEND_SWIGLU=cpp"):
        resolve_backend("swiglu", SIMULATED_DEVICES["a100"], bf16, native=NATIVE_ALL)


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTLORA_BACKEND: unknown backend 'fast'"):
        resolve_backend("swiglu", SIMULATED_DEVICES["a100"], bf16, native=NATIVE_ALL)


def test_use_backend_context(monkeypatch):
    h100 = SIMULATED_DEVICES["h100"]
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    with use_backend("torch"):
        assert resolve_backend("swiglu", h100, bf16, native=NATIVE_ALL)[0] is TORCH
        with use_backend(swiglu="triton"):
            assert resolve_backend("swiglu", h100, bf16, native=NATIVE_ALL)[0] is T
        assert resolve_backend("swiglu", h100, bf16, native=NATIVE_ALL)[0] is TORCH
    assert resolve_backend("swiglu", h100, bf16, native=NATIVE_ALL)[0] is T
    # the caller's argument beats the context
    with use_backend("torch"):
        assert resolve_backend("swiglu", h100, bf16, "triton", native=NATIVE_ALL)[0] is T


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown op 'rope2'"):
        with use_backend(rope2="torch"):
            pass
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with use_backend("gpu"):
            pass


def test_unknown_op_and_unsupported_dtype():
    with pytest.raises(ValueError, match="unknown op 'nope'.*swiglu"):
        resolve_backend("nope", SIMULATED_DEVICES["cpu"], fp32)
    with pytest.raises(TypeError, match="swiglu: dtype torch.int32 is not supported"):
        resolve_backend("swiglu", SIMULATED_DEVICES["cpu"], torch.int32, native=NATIVE_ALL)


def test_register_op_validates_candidates():
    with pytest.raises(ValueError, match="must end with the torch reference"):
        dispatch.register_op("bad_op", [T, CPP])
    with pytest.raises(ValueError, match="unknown backend 'metal'"):
        dispatch.register_op("bad_op", ["metal", TORCH])
    assert "bad_op" not in policies()


def test_auto_fallback_logs_its_reason_once(caplog):
    info = SIMULATED_DEVICES["t4"].replace(name="Tesla T4 (log test)")
    with caplog.at_level(logging.INFO, logger="fastlora"):
        for _ in range(3):
            resolve_backend("swiglu", info, bf16, native=NATIVE_ALL)
    records = [r for r in caplog.records if "swiglu" in r.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING  # a GPU losing its fast path deserves a warning
    assert "bf16" in records[0].getMessage()


def test_real_cpu_resolution():
    backend, reason = resolve_backend("swiglu", "cpu", fp32)
    native = dispatch._native_kernels()
    assert backend is (CPP if ("swiglu", "cpu") in native else TORCH)


def test_would_run_answers_for_requests_made_for_every_op(monkeypatch):
    """A fast path's question ("would nf4_matmul run on Triton here?") is answered, not raised, under a request
    for every op that the op cannot honour; a request naming the op is held to."""
    cpu = SIMULATED_DEVICES["cpu"].replace(triton_usable=True, triton_reason="interpreter")
    a100, t4 = SIMULATED_DEVICES["a100"], SIMULATED_DEVICES["t4"]
    would_run = dispatch.would_run
    assert would_run("nf4_matmul", T, a100, bf16, native=NATIVE_ALL)
    assert not would_run("nf4_matmul", T, cpu, fp32, native=NATIVE_ALL)  # auto: not the interpreter
    with use_backend("cpp"):
        assert not would_run("nf4_matmul", T, cpu, fp32, native=NATIVE_ALL)
        with pytest.raises(BackendUnavailableError, match="nf4_matmul has no cpp"):
            resolve_backend("nf4_matmul", cpu, fp32, native=NATIVE_ALL)  # a call still raises
    assert not would_run("nf4_matmul", T, t4, fp16, native=NATIVE_ALL)  # no tensor cores for Triton's tl.dot there
    with use_backend("triton"):
        assert would_run("nf4_matmul", T, cpu, fp32, native=NATIVE_ALL)
        assert not would_run("nf4_matmul", T, t4, bf16, native=NATIVE_ALL)  # the other path raises, if anything
    with use_backend(nf4_matmul="cpp"), pytest.raises(BackendUnavailableError, match="use_backend\\(nf4_matmul"):
        would_run("nf4_matmul", T, cpu, fp32, native=NATIVE_ALL)
    monkeypatch.setenv("FASTLORA_BACKEND", "cuda")
    assert not would_run("nf4_matmul", T, a100, bf16, native=NATIVE_ALL)
    monkeypatch.setenv("FASTLORA_BACKEND_NF4_MATMUL", "cuda")
    with pytest.raises(BackendUnavailableError, match="FASTLORA_BACKEND_NF4_MATMUL=cuda"):
        would_run("nf4_matmul", T, a100, bf16, native=NATIVE_ALL)


def test_an_unknown_backend_variable_warns_once_and_env_lists_it(monkeypatch, caplog):
    """FASTLORA_BACKEND_<TYPO> does nothing: the first dispatch decision warns, and fastlora env says so."""
    import fastlora
    from fastlora.env import collect

    monkeypatch.setenv("FASTLORA_BACKEND_SWIGGLU", "torch")
    monkeypatch.setenv("FASTLORA_BACKEND_SWIGLU", "torch")  # a real op's: not reported
    monkeypatch.setenv("FASTLORA_BACKEND_LORA_LINEAR", "torch")  # an op measured by variants: not reported
    assert dispatch.unknown_backend_variables() == ["FASTLORA_BACKEND_SWIGGLU"]
    dispatch._resolve_cached.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        fastlora.swiglu(torch.randn(4), torch.randn(4))
    assert any("FASTLORA_BACKEND_SWIGGLU is set but names no op" in r.getMessage() for r in caplog.records)
    assert any("FASTLORA_BACKEND_SWIGGLU" in w for w in collect("cpu")["warnings"])
