"""The benchmark harness: timer, peak memory, the correctness gate, the CSV files and ``fastlora bench``."""

from __future__ import annotations

import argparse
import csv
import datetime
import time

import pytest
import torch

import fastlora
from fastlora.benchmarks import cli, harness, results, timing
from fastlora.benchmarks.harness import Case, Provider, Roofline, Shapes, Suite, Unavailable, Work
from fastlora.benchmarks.suites import SUITES, select

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def short_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the CPU timer's windows tiny: these tests check the harness, not the machine."""
    monkeypatch.setitem(timing.CPU_BUDGET_S, True, 0.005)
    monkeypatch.setitem(timing.CPU_BUDGET_S, False, 0.02)


def _synthetic_suite(name: str = "synthetic") -> Suite:
    """x * 2 + 1: a reference, a correct fastlora provider, a wrong one, an unavailable peer and a crashing one."""
    def make(provider: str, mode: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Case:
        x = harness.randn(shape, device=device, dtype=dtype)
        fns = {
            "torch": lambda t: t * 2 + 1,
            "good": lambda t: torch.addcmul(torch.ones_like(t), t, torch.full_like(t, 2.0)),
            "wrong": lambda t: t * 2 + 1.5,
        }
        if provider == "peer":
            raise Unavailable("peer is not installed")
        if provider == "crash":
            raise RuntimeError("boom")
        return harness.autograd_case(fns[provider], [x], mode, forward=Work(bytes=2 * x.nbytes),
                                     backward=Work(bytes=2 * x.nbytes))

    return Suite(
        name=name,
        providers=(Provider("torch", "reference"), Provider("good"), Provider("wrong"),
                   Provider("peer", "baseline"), Provider("crash", "baseline")),
        modes=("forward", "full"),
        shapes=Shapes(gpu=((64, 64),), cpu=((64, 64),), cpu_quick=((32, 48),)),
        make=make,
        dtype=lambda device: torch.float32,  # the gate's numbers below are fp32's, whatever the device's default
    )


def test_wall_clock_percentiles_are_ordered_and_measure_the_call() -> None:
    t = timing.wall_clock(lambda: time.sleep(0.002), budget_s=0.02)
    assert t.reps is not None and t.reps >= 3
    assert 2.0 <= t.p20_ms <= t.median_ms <= t.p80_ms < 1000.0


def test_wall_clock_stops_at_the_budget() -> None:
    start = time.perf_counter()
    t = timing.wall_clock(lambda: None, budget_s=0.02, max_reps=10**9)
    assert time.perf_counter() - start < 1.0
    assert t.reps is not None and t.reps > 100  # a no-op fits many calls in 20 ms


def test_summarize_interpolates_percentiles() -> None:
    t = timing.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.reps) == (3.0, 5)
    assert t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)


def test_cpu_peak_memory_sees_a_known_allocation() -> None:
    four_mb = 4 << 20
    assert timing.peak_memory(lambda: torch.empty(four_mb // 4), CPU) >= four_mb

    def alloc_free_alloc() -> torch.Tensor:
        a = torch.empty(four_mb // 4)
        del a
        return torch.empty(four_mb // 4)

    # Two 4 MB tensors that never coexist: the peak is one of them, not their sum.
    assert four_mb <= timing.peak_memory(alloc_free_alloc, CPU) < 2 * four_mb


def test_gate_compare() -> None:
    ref = torch.tensor([1.0, 2.0, 3.0])
    assert harness.compare([ref + 1e-6], [ref], rtol=1e-4, atol=1e-5)[0]
    agrees, err, why = harness.compare([ref + torch.tensor([0.0, 0.5, 0.0])], [ref], rtol=1e-4, atol=1e-5)
    assert not agrees and err == pytest.approx(0.5) and "1 of 3" in why
    assert not harness.compare([torch.tensor([1.0, float("nan"), 3.0])], [ref], rtol=1e-4, atol=1e-5)[0]
    assert not harness.compare([ref[:2]], [ref], rtol=1e-4, atol=1e-5)[0]
    assert not harness.compare([ref], [ref, ref], rtol=1e-4, atol=1e-5)[0]


def test_gate_compare_rms_share() -> None:
    """The rms share widens the bound by a share of the reference's rms, for every element alike."""
    ref = torch.tensor([0.0, 3.0, 4.0, 0.0])  # rms 2.5
    near_zero_off = ref + torch.tensor([0.2, 0.0, 0.0, 0.0])
    assert not harness.compare([near_zero_off], [ref], rtol=1e-2, atol=1e-2)[0]
    assert harness.compare([near_zero_off], [ref], rtol=1e-2, atol=1e-2, rms_share=0.1)[0]
    agrees, _, why = harness.compare([ref + 0.3], [ref], rtol=1e-2, atol=1e-2, rms_share=0.1)
    assert not agrees and "rms_share=0.1" in why


@pytest.mark.parametrize(("suite", "shape"), [("lora", (512, 1024, 256, 16, 0)), ("lora", (512, 1024, 256, 16, 1)),
                                              ("lora_mlp", (512, 256, 512, 16, 0))])
def test_lora_suites_gate_fastlora_in_bf16(suite: str, shape: tuple[int, ...]) -> None:
    """In bf16 PEFT runs as HF Trainer's bf16=True runs it (autocast), so fastlora passes the gate where, against
    PEFT's fp32 LoRA branch or without lora_mlp's rms share, hundreds to thousands of elements failed it."""
    pytest.importorskip("peft")
    chosen = SUITES[suite]
    harness.prepare(chosen, Provider("peft", "reference"), "full", shape, CPU, torch.bfloat16)
    _, result = harness.prepare(chosen, Provider("fastlora", "fastlora"), "full", shape, CPU, torch.bfloat16)
    assert result.status == "ok", result.reason


def test_autograd_case_backward_times_only_the_backward() -> None:
    calls = []

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return (x * w).sin()

    x, w = torch.randn(8, 16), torch.randn(8, 16)
    case = harness.autograd_case(f, [x, w], "backward", forward=Work(), backward=Work(bytes=1),
                                 requires_grad=[True, False])
    dx = case.fn()
    case.fn()
    assert len(calls) == 1  # the graph was built once, outside the timed calls
    assert len(dx) == 1 and x.grad is None  # gradients are returned, not accumulated
    grad = harness.randn((8, 16), device=CPU, dtype=torch.float32, seed=1000)
    torch.testing.assert_close(dx[0], grad * (x * w).cos() * w)


def test_roofline_share_and_metric() -> None:
    roof = Roofline(copy_gbps=20.0, matmul_tflops=0.5)
    assert roof.bound(Work(bytes=2 * 10**9)) == (pytest.approx(0.1), "GB/s")
    assert roof.bound(Work(bytes=1, flops=10**12)) == (pytest.approx(2.0), "TFLOP/s")
    r = harness.Result("s", "p", "fastlora", "forward", "1", "float32", "ok",
                       timing=timing.Timing(200.0, 190.0, 210.0, 5), work=Work(bytes=2 * 10**9))
    done = r.with_roofline(roof)
    assert done.metric == "GB/s"
    assert done.achieved == pytest.approx(10.0) and done.roofline_share == pytest.approx(0.5)


def test_wrong_provider_fails_the_gate_and_is_not_saved(tmp_path) -> None:
    suite = _synthetic_suite()
    done = harness.run_suite(suite, CPU, quick=True, roofline=Roofline(20.0, 0.5))
    status = {(r.provider, r.mode): r for r in done}
    for mode in suite.modes:
        assert status["torch", mode].ok and status["good", mode].ok
        assert status["good", mode].max_error is not None and status["good", mode].max_error < 1e-5
        wrong = status["wrong", mode]
        assert wrong.status == "failed" and wrong.timing is None and wrong.fatal
        assert wrong.max_error == pytest.approx(0.5) and "disagrees with torch" in wrong.reason
        assert status["peer", mode].status == "skipped" and "not installed" in status["peer", mode].reason
        assert status["crash", mode].status == "error" and not status["crash", mode].fatal
    good = status["good", "full"]
    assert good.timing is not None and good.timing.median_ms > 0 and good.peak_mem_bytes is not None
    assert good.metric == "GB/s" and good.achieved > 0 and good.roofline_share > 0

    path = results.save(done, CPU, quick=True, directory=tmp_path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["provider"], r["mode"]) for r in rows) == [
        ("good", "forward"), ("good", "full"), ("torch", "forward"), ("torch", "full")]
    assert {r["shape"] for r in rows} == {"32x48"}


def test_csv_header_append_and_environment(tmp_path) -> None:
    done = harness.run_suite(_synthetic_suite(), CPU, quick=True)
    first = results.save(done, CPU, quick=True, directory=tmp_path)
    second = results.save(done, CPU, quick=False, directory=tmp_path)
    assert first == second == tmp_path / f"{results.device_slug(CPU)}.csv"
    lines = first.read_text().splitlines()
    assert lines[0] == ",".join(results.COLUMNS) and sum(line.startswith("timestamp") for line in lines) == 1
    with open(first, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and [r["quick"] for r in rows] == ["True"] * 4 + ["False"] * 4
    info = fastlora.device_info(CPU)
    row = rows[0]
    assert row["torch"] == torch.__version__ and row["device_name"] == info.name and row["device"] == "cpu"
    assert row["fastlora_version"] == fastlora.__version__ and row["triton"] == (info.versions["triton"] or "")
    assert row["fastlora_commit"] == results.fastlora_commit()
    assert datetime.datetime.fromisoformat(row["timestamp"]).tzinfo is not None
    assert float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
    assert row["metric"] == "GB/s" and row["roofline_share"] == ""  # no roofline was given


def test_csv_with_older_columns_is_migrated_not_lost(tmp_path) -> None:
    path = tmp_path / f"{results.device_slug(CPU)}.csv"
    path.write_text("timestamp,suite,provider,median_ms\n2024-01-01T00:00:00+00:00,old,torch,1.5\n")
    results.save(harness.run_suite(_synthetic_suite(), CPU, quick=True), CPU, quick=True, directory=tmp_path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert set(results.COLUMNS) <= set(reader.fieldnames)
    assert rows[0]["suite"] == "old" and rows[0]["median_ms"] == "1.5" and rows[0]["device"] == ""
    assert len(rows) == 5 and rows[-1]["device"] == "cpu"


def test_device_slug(monkeypatch: pytest.MonkeyPatch) -> None:
    assert results.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    cpu = fastlora.device_info(CPU)
    gpu = cpu.replace(vendor="nvidia", device_type="cuda", index=0, name="NVIDIA H100 80GB HBM3")
    fake = {"cpu": cpu.replace(name="AMD EPYC 7B13"), "cuda:0": gpu}
    monkeypatch.setattr(fastlora, "device_info", lambda device=None: fake[str(device)])
    assert results.device_slug("cpu") == "cpu-amd-epyc-7b13"
    assert results.device_slug("cuda:0") == "nvidia-h100-80gb-hbm3"


def test_results_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTLORA_RESULTS_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert results.results_dir() == tmp_path / "data" / "fastlora" / "results"  # not under the working directory
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert results.results_dir() == tmp_path / "home" / ".local" / "share" / "fastlora" / "results"
    monkeypatch.setenv("FASTLORA_RESULTS_DIR", str(tmp_path / "env"))
    assert results.results_dir() == tmp_path / "env"
    assert results.results_dir(tmp_path / "flag") == tmp_path / "flag"


def test_select_suites() -> None:
    assert [s.name for s in select(None)][0] == "roofline"
    assert [s.name for s in select(["swiglu"])] == ["roofline", "swiglu"]
    assert [s.name for s in select(["roofline,swiglu"])] == ["roofline", "swiglu"]
    with pytest.raises(ValueError, match=f"available: {', '.join(SUITES)}"):
        select(["nope"])


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastlora bench")
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_unknown_op_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse("--op", "swiglu,nope")
    assert exc.value.code == 2
    assert f"unknown suite 'nope' (available: {', '.join(SUITES)})" in capsys.readouterr().err
    assert cli.run(argparse.Namespace(op=[["nope"]], quick=True, results_dir=None, no_save=True,
                                      device=None)) == 2


def test_cli_quick_swiglu_prints_tables_and_saves(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert cli.run(_parse("--op", "swiglu", "--quick", "--results-dir", str(tmp_path), "--device", "cpu",
                          "--dtype", "float32")) == 0
    out = capsys.readouterr().out
    assert "roofline" in out and "GB/s copy" in out and "TFLOP/s matmul" in out
    table = out[out.index("swiglu - silu(gate) * up"):]
    assert "(float32)" in table.splitlines()[0]
    for provider in ("torch", "compile", "fastlora-cpp", "fastlora-triton"):
        assert provider in table
    for mode in ("forward", "backward", "full"):
        assert f"| {mode}" in table
    assert "1.00x" in table and "MiB" in table and "not run in quick mode" in table
    with open(tmp_path / f"{results.device_slug(CPU)}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    saved = {(r["suite"], r["provider"]) for r in rows}
    assert ("roofline", "copy") in saved and ("swiglu", "torch") in saved
    assert not any(r["provider"] in ("compile", "fastlora-triton") for r in rows)
    assert all(r["quick"] == "True" and float(r["roofline_share"]) > 0 for r in rows)


def test_cli_dtype_option(capsys: pytest.CaptureFixture[str]) -> None:
    """``--dtype`` runs every suite (the roofline too) in that dtype on any CPU; the default is the device's."""
    assert cli.run(_parse("--op", "swiglu", "--quick", "--no-save", "--device", "cpu", "--dtype", "bfloat16")) == 0
    out = capsys.readouterr().out
    assert "(bfloat16)" in out[out.index("swiglu - silu(gate) * up"):].splitlines()[0]
    assert harness.default_dtype(CPU) is torch.float32 is fastlora.device_info(CPU).compute_dtype
    with pytest.raises(SystemExit):
        _parse("--dtype", "int8")
    assert fastlora.device.parse_dtype("bf16") is torch.bfloat16 is fastlora.device.parse_dtype(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be one of float32, fp32"):
        fastlora.device.parse_dtype("float64")


def test_cli_no_save_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLORA_RESULTS_DIR", str(tmp_path))
    assert cli.run(_parse("--op", "roofline", "--quick", "--no-save", "--device", "cpu")) == 0
    assert "| copy" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_cli_fails_when_a_fastlora_provider_fails_the_gate(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SUITES, "synthetic", _synthetic_suite())
    assert cli.run(_parse("--op", "synthetic", "--quick", "--no-save", "--device", "cpu")) == 1
    captured = capsys.readouterr()
    assert "FAILED gate" in captured.out and "disagrees with torch" in captured.out
    assert "failed the correctness gate" in captured.err


def test_compiled_providers_are_skipped_when_quick_on_cpu_or_when_compiling_fails() -> None:
    def make(provider: str, mode: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Case:
        x = harness.randn(shape, device=device, dtype=dtype)
        if provider == "broken-compile":
            def fail() -> torch.Tensor:
                raise RuntimeError("InductorError: no C++ compiler")
            return Case(fn=fail, work=Work(bytes=x.nbytes))
        return Case(fn=lambda: x * 2, work=Work(bytes=2 * x.nbytes))

    suite = Suite(name="compiled", providers=(Provider("torch", "reference"),
                                              Provider("broken-compile", "baseline", compiled=True)),
                  modes=("forward",), shapes=Shapes(gpu=((8,),), cpu=((8,),), cpu_quick=((8,),)), make=make)
    quick = {r.provider: r for r in harness.run_suite(suite, CPU, quick=True)}
    assert quick["broken-compile"].status == "skipped" and "quick mode" in quick["broken-compile"].reason
    full = {r.provider: r for r in harness.run_suite(suite, CPU, quick=False)}
    assert full["broken-compile"].status == "skipped"
    assert full["broken-compile"].reason == "torch.compile failed: RuntimeError: InductorError: no C++ compiler"
    assert full["torch"].status == "ok"
