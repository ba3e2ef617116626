"""fastlora demo: the patched run follows the unpatched loss curve, and the command prints the comparison."""

import pytest
import torch

from fastlora.demo import corpus_bytes, run_demo

# Compared against torch's CPU kernels, whose summation order follows the CPU's instruction set: .ci/run runs
# these again under ATEN_CPU_CAPABILITY=avx2 and default.
pytestmark = pytest.mark.cpu_kernels


def test_thirty_steps_follow_the_unpatched_loss_curve():
    """The demo's two runs, in fp32 (the CPU default) and said so: the curves measured 1e-6 apart on this tiny
    model. How closely a patched model follows the unpatched one is held to the tolerance rule in
    tests/test_patch.py; this checks that the demo trains both alike and reports them."""
    pytest.importorskip("peft")
    result = run_demo(steps=30, size="tiny", device="cpu", seq_len=32, dtype=torch.float32)
    unpatched, patched = result.runs
    assert "in torch.float32" in result.description
    assert len(unpatched.losses) == len(patched.losses) == 30
    assert unpatched.losses[-1] < unpatched.losses[0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(patched.losses), torch.tensor(unpatched.losses), rtol=1e-4, atol=1e-4)
    assert unpatched.tokens_per_s > 0 and patched.tokens_per_s > 0 and patched.peak_bytes > 0
    for r in result.runs:  # every step after the first timed, the median between its percentiles
        assert len(r.step_seconds) == 29 and r.tokens_per_s_p20 <= r.tokens_per_s <= r.tokens_per_s_p80
    assert "lora_linear" in result.patch_report


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_command_prints_the_table(capsys, dtype):
    """By default a CPU trains in fp32, whatever its bf16 instructions; ``--dtype bfloat16`` on any CPU."""
    from fastlora.cli import main

    assert main(["demo", "--steps", "3", "--seq-len", "16", "--device", "cpu",
                 *(["--dtype", dtype] if dtype else [])]) == 0
    out = capsys.readouterr().out
    assert "unpatched loss" in out and "tokens/s" in out and "fastlora patch of a llama model" in out
    assert f"on cpu in torch.{dtype or 'float32'}" in out


def test_corpus_ships_with_the_package():
    assert len(corpus_bytes()) > 1000


def test_bad_arguments():
    with pytest.raises(ValueError, match="size must be one of"):
        run_demo(size="huge")
    with pytest.raises(ValueError, match="steps must be at least 2"):
        run_demo(steps=1)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        run_demo(batch_size=0)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        run_demo(seq_len=1)


@pytest.mark.parametrize(("argv", "says"), [
    ("demo --size huge", "invalid choice: 'huge'"),
    ("demo --steps 1", "--steps: must be at least 2"),
    ("demo --steps x", "expected an integer, got 'x'"),
    ("demo --batch-size 0", "--batch-size: must be at least 1, got 0"),
    ("demo --seq-len 1", "--seq-len: must be at least 2"),
    ("demo --model /no/such/dir", "--model: no such directory: /no/such/dir"),
    ("env --device tpu", "unknown device 'tpu'"),
    ("tune --config huge", "invalid choice: 'huge'"),
    ("plan --config llama-3.1-8b --rank 0", "--rank: must be at least 1"),
])
def test_command_line_errors_are_one_line_with_exit_2(argv, says, capsys):
    from fastlora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv.split())
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and err.startswith(f"fastlora {argv.split()[0]}: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a torch with a usable CUDA device")
def test_a_cuda_request_without_cuda_says_so(capsys):
    from fastlora.cli import main

    for command in ("demo", "env"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--device", "cuda"])
        assert exit_info.value.code == 2
        cpu_build = torch.version.cuda is None and torch.version.hip is None
        assert ("this torch has no CUDA" if cpu_build else "torch sees no CUDA device") in capsys.readouterr().err


def test_speed_is_the_median_of_interleaved_steps_with_its_spread_and_warnings():
    """tokens/s is each run's median over its timed steps with the 20th-80th percentiles; the ratio is the median of
    the step-by-step ratios; a busy machine or a wide spread of those ratios is said, not hidden."""
    import os

    from fastlora.demo import DemoResult, RunResult, format_result, speed_ratio, warnings_for

    def run(name, seconds):
        return RunResult(name, losses=[1.0] * (len(seconds) + 1), tokens_per_s=1.0, step_seconds=seconds)

    steady = DemoResult("d", [run("unpatched", [1.0, 1.0, 1.1, 1.0, 0.9]), run("fastlora", [0.5] * 5)], "r",
                        (0.0, 0.0))
    p20, p50, p80 = speed_ratio(steady)
    assert p20 <= p50 == 2.0 <= p80 and warnings_for(steady) == []
    assert "(2.00x, p20-p80" in format_result(steady) and "WARNING" not in format_result(steady)
    cores = os.cpu_count() or 1
    busy = DemoResult("d", steady.runs, "r", (0.1, cores + 1.0))
    assert any("machine was busy" in w for w in warnings_for(busy))
    swinging = DemoResult("d", [run("unpatched", [1.0, 3.0, 1.0, 3.0, 1.0]), run("fastlora", [1.0] * 5)], "r",
                          (0.0, 0.0))
    (warning,) = warnings_for(swinging)
    assert "too wide" in warning and "WARNING: the step ratios spread" in format_result(swinging)

