"""The NF4 dequantize benchmark suite: registered, gated and timed in a quick CPU run, its work model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastlora
from fastlora.benchmarks import harness, timing
from fastlora.benchmarks.suites import SUITES, nf4, select

CPU = torch.device("cpu")
QUICK_SHAPE = nf4.SUITE.shapes.cpu_quick[0]


@pytest.fixture(autouse=True)
def short_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the CPU timer's windows tiny: these tests check the suite, not the machine."""
    monkeypatch.setitem(timing.CPU_BUDGET_S, True, 0.005)
    monkeypatch.setitem(timing.CPU_BUDGET_S, False, 0.02)


@pytest.fixture(scope="module")
def quick_results() -> dict[str, harness.Result]:
    """One quick CPU run of the suite, by provider (the budget is patched by hand: fixtures of module scope
    cannot use monkeypatch)."""
    saved = dict(timing.CPU_BUDGET_S)
    timing.CPU_BUDGET_S.update({True: 0.005, False: 0.02})
    try:
        results = harness.run_suite(nf4.SUITE, CPU, quick=True, dtype=torch.float32)
    finally:
        timing.CPU_BUDGET_S.update(saved)
    return {r.provider: r for r in results}


def test_suite_is_registered_after_swiglu() -> None:
    assert SUITES["nf4"] is nf4.SUITE
    assert list(SUITES).index("nf4") > list(SUITES).index("swiglu")
    assert [s.name for s in select(["nf4"])] == ["roofline", "nf4"]
    assert nf4.SUITE.modes == ("forward",)
    assert nf4.SUITE.reference == "torch"


def test_quick_cpu_run_passes_the_gate(quick_results: dict[str, harness.Result]) -> None:
    assert set(quick_results) == {p.name for p in nf4.SUITE.providers}
    wanted = ["torch", "fastlora", "fastlora-out"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        wanted.append("bitsandbytes")
    for name in wanted:
        r = quick_results[name]
        assert r.status == "ok", f"{name}: {r.status} {r.reason}"
        assert r.timing is not None and r.timing.median_ms > 0
        assert r.metric == "GB/s" and r.achieved and r.achieved > 0
        assert r.shape == "256x1024" and r.dtype == "float32"
    # Dequantization is exact in fp32: every provider gives the reference's bits.
    for name in wanted[1:]:
        assert quick_results[name].max_error == 0.0, name
    assert not any(r.fatal for r in quick_results.values())


def test_gpu_and_slow_providers_are_skipped_on_cpu(quick_results: dict[str, harness.Result]) -> None:
    triton = quick_results["fastlora-triton"]
    assert triton.status == "skipped" and "interpreter" in triton.reason
    assert quick_results["compile"].status == "skipped"
    cuda = quick_results["fastlora-cuda"]
    assert cuda.status == "skipped" and "GPU" in cuda.reason
    cpp = quick_results["fastlora-cpp"]
    assert cpp.status in ("ok", "skipped") and (cpp.status == "ok" or cpp.reason)


def test_cpp_provider_is_skipped_with_the_reason_when_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(op: str, device: object, dtype: object, backend: str = "auto") -> object:
        raise fastlora.BackendUnavailableError(f"{op}: backend {backend} is not available: no native kernel")

    monkeypatch.setattr(fastlora, "resolve_backend", unavailable)
    case, result = harness.prepare(nf4.SUITE, harness.Provider("fastlora-cpp"), "forward", QUICK_SHAPE, CPU,
                                   torch.float32, quick=True)
    assert case is None and result.status == "skipped" and "no native kernel" in result.reason


def test_work_counts_codes_scales_and_output() -> None:
    # 256 x 1024 = 262144 elements: 131072 bytes of codes, 4096 blocks of 64 (one uint8 each), 16 fp32 scales
    # of the second level, and the output.
    assert nf4.work((256, 1024), torch.float32) == harness.Work(bytes=131072 + 4096 + 16 * 4 + 262144 * 4)
    assert nf4.work((256, 1024), torch.bfloat16).bytes == 131072 + 4096 + 16 * 4 + 262144 * 2
    # The same bytes as the weight's own tensors hold (less the 1 KB code table and the offset).
    w = nf4._weight(QUICK_SHAPE, "cpu", torch.float32)
    stored = w.data.nbytes + w.absmax.nbytes + w.absmax2.nbytes
    assert nf4.work(QUICK_SHAPE, torch.float32).bytes == stored + w.numel * 4
    assert nf4.work(QUICK_SHAPE, torch.float32).flops == 0


def test_weight_is_quantized_once_per_shape_and_shared() -> None:
    w = nf4._weight(QUICK_SHAPE, "cpu", torch.float32)
    assert nf4._weight(QUICK_SHAPE, "cpu", torch.float32) is w
    assert w.shape == QUICK_SHAPE and w.dtype == torch.float32 and w.nested and w.blocksize == 64


def test_out_provider_allocates_nothing(quick_results: dict[str, harness.Result]) -> None:
    backend, _ = fastlora.resolve_backend("nf4_dequantize", CPU, torch.float32)
    if backend is fastlora.Backend.TORCH:
        pytest.skip("the pure-PyTorch backend computes into temporaries before copying into out")
    out_bytes = QUICK_SHAPE[0] * QUICK_SHAPE[1] * 4
    peak = quick_results["fastlora-out"].peak_mem_bytes
    assert peak is not None and peak < out_bytes
    # The allocating provider holds at least its output.
    assert quick_results["fastlora"].peak_mem_bytes >= out_bytes


def test_each_cpp_path_is_timed_exact_or_skipped_with_the_reason(quick_results: dict[str, harness.Result]) -> None:
    for path in ("avx512", "avx2", "portable"):
        for name in (f"fastlora-cpp-{path}", f"fastlora-cpp-{path}-out"):
            r = quick_results[name]
            assert r.status in ("ok", "skipped"), f"{name}: {r.status} {r.reason}"
            if r.status == "ok":
                assert r.max_error == 0.0, name
            else:
                assert r.reason, name
