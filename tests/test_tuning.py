"""Measured dispatch (fastlora.tuning): the faster capable backend is chosen, a wrong one is excluded with a warning,
decisions persist across processes and are dropped on a version change, and nothing is measured where a backend
is asked for, with FASTLORA_TUNE=0, or while torch.compile traces."""

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import fastlora
from fastlora import dispatch, tuning
from fastlora.dispatch import Backend, register_op, unregister_op

OP = "tuning_probe"


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    """Measuring on, decisions in a file of this test, and a probe op whose C++ and torch candidates both run."""
    monkeypatch.setenv("FASTLORA_TUNE", "1")
    monkeypatch.setenv("FASTLORA_TUNING_CACHE", str(tmp_path / "tuning.json"))
    register_op(OP, [Backend.CPP, Backend.TORCH])
    native = dispatch._native_kernels()
    monkeypatch.setattr(dispatch, "_native_kernels", lambda: native | {(OP, "cpu")})
    dispatch._resolve_cached.cache_clear()
    yield tmp_path / "tuning.json"
    unregister_op(OP)


def _probe(slow=(), wrong=(), calls=None):
    """A run function: each backend returns x * 2 (``wrong`` ones x * 3), ``slow`` ones after 2 ms."""
    x = torch.arange(8.0)

    def run(b):
        if calls is not None:
            calls.append(b)
        if b.value in slow:
            time.sleep(0.002)
        return x * (3 if b.value in wrong else 2)

    return run


def _choose(run, requested="auto", size=100):
    return tuning.choose(OP, torch.device("cpu"), torch.float32, requested, size, run, tuning.close(torch.float32))


def test_the_faster_candidate_wins_either_way(tuned):
    assert _choose(_probe(slow=("torch",))) is Backend.CPP
    assert _choose(_probe(slow=("cpp",)), size=10_000) is Backend.TORCH  # another bucket, another decision
    decisions = tuning.tuner().decisions()
    assert len(decisions) == 2
    fast, slow = sorted(decisions.values(), key=lambda m: m.backend)
    assert fast.times_us["torch"] > 1000 > fast.times_us["cpp"] and slow.times_us["cpp"] > 1000


def test_a_wrong_candidate_is_excluded_with_a_warning(tuned, caplog):
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        assert _choose(_probe(slow=("torch",), wrong=("cpp",))) is Backend.TORCH
    assert any("cpp excluded" in r.getMessage() and "differs from the reference" in r.getMessage()
               for r in caplog.records)
    (m,) = tuning.tuner().decisions().values()
    assert "cpp" in m.excluded and "cpp" not in m.times_us


def test_a_decision_is_measured_once_and_reused(tuned):
    calls = []
    assert _choose(_probe(slow=("torch",), calls=calls)) is Backend.CPP
    measured = len(calls)
    assert measured >= 2 * tuning.MIN_REPEATS
    assert _choose(_probe(slow=("cpp",), calls=calls)) is Backend.CPP  # the same bucket: the kept decision
    assert len(calls) == measured


def test_decisions_persist_and_a_version_change_drops_them(tuned, monkeypatch):
    _choose(_probe(slow=("torch",)))
    stored = json.loads(tuned.read_text())
    assert stored["versions"]["fastlora"] == fastlora.__version__ and len(stored["decisions"]) == 1
    assert len(tuning.Tuner(tuned).decisions()) == 1  # a new process reads it back
    monkeypatch.setattr(tuning, "_versions", lambda: {"torch": "0", "triton": "0", "fastlora": "0"})
    assert tuning.Tuner(tuned).decisions() == {}


def test_nothing_is_measured_when_a_backend_is_asked_for_or_tuning_is_off(tuned, monkeypatch):
    calls = []
    run = _probe(calls=calls)
    assert _choose(run, requested="torch") is Backend.TORCH
    with fastlora.use_backend(**{OP: "torch"}):
        assert _choose(run) is Backend.TORCH
    monkeypatch.setenv(f"FASTLORA_BACKEND_{OP.upper()}", "torch")
    assert _choose(run) is Backend.TORCH
    monkeypatch.delenv(f"FASTLORA_BACKEND_{OP.upper()}")
    monkeypatch.setenv("FASTLORA_TUNE", "0")
    assert _choose(run) is Backend.CPP  # the static table's first capable candidate
    monkeypatch.setenv("FASTLORA_TUNE", "1")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _choose(run) is Backend.CPP
    assert calls == [] and not tuned.exists()


def test_threads_racing_to_the_first_call_measure_once(tuned):
    calls = []
    run = _probe(slow=("torch",), calls=calls)
    results = []
    threads = [threading.Thread(target=lambda: results.append(_choose(run))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [Backend.CPP] * 4
    assert calls.count(Backend.TORCH) <= 1 + tuning.MAX_REPEATS + 1  # one measurement: reference, warm-up, repeats


def test_swiglu_on_a_cpu_is_tuned_and_another_process_reuses_the_decision(tuned):
    """The real op: its C++ kernel and the reference timed on this CPU, the output still right, and a fresh
    interpreter with the same cache file decides the same without measuring."""
    if Backend.CPP not in dispatch.capable_backends("swiglu", "cpu", torch.float32):
        pytest.skip("the native extension did not build here: one candidate, nothing to tune")
    gate, up = torch.randn(4096), torch.randn(4096)
    from fastlora.ops.swiglu import swiglu_reference

    torch.testing.assert_close(fastlora.swiglu(gate, up), swiglu_reference(gate, up))
    (key, m), = tuning.tuner().decisions().items()
    assert key.startswith("swiglu.fwd|cpu:") and set(m.times_us) == {"cpp", "torch"} and not m.excluded
    code = ("import torch, fastlora; from fastlora import tuning; "
            "fastlora.swiglu(torch.randn(4096), torch.randn(4096)); "
            f"print(tuning.tuner().decisions()[{key!r}].backend)")
    env = {**os.environ, "FASTLORA_TUNE": "1", "FASTLORA_TUNING_CACHE": str(tuned)}
    env.pop("TRITON_INTERPRET", None)
    before = tuned.stat().st_mtime_ns
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == m.backend
    assert tuned.stat().st_mtime_ns == before  # read, not measured and written again


def test_nf4_dequantize_is_tuned_with_equality_as_its_check(tuned):
    if Backend.CPP not in dispatch.capable_backends("nf4_dequantize", "cpu", torch.float32):
        pytest.skip("the native extension did not build here: one candidate, nothing to tune")
    w = fastlora.quantize_nf4(torch.randn(64, 128))
    with fastlora.use_backend(nf4_dequantize="torch"):
        want = fastlora.dequantize_nf4(w)  # asked for: not tuned
    assert tuning.tuner().decisions() == {}
    assert torch.equal(fastlora.dequantize_nf4(w), want)
    (key, m), = tuning.tuner().decisions().items()
    assert key.startswith("nf4_dequantize|cpu:") and set(m.times_us) == {"cpp", "torch"} and not m.excluded


def test_a_kept_decision_loads_what_its_backend_needs_in_a_new_process(tuned):
    """A decision read from the file, in a process that has not asked the dispatcher anything yet, must still find
    the native extension loaded (it was not, and the C++ op was missing); one for a backend that cannot run here is
    measured again."""
    if Backend.CPP not in dispatch.capable_backends("nf4_dequantize", "cpu", torch.float32):
        pytest.skip("the native extension did not build here")
    key = f"nf4_dequantize|{tuning._device_name('cpu')}|float32|2**13"
    tuned.write_text(json.dumps({"versions": tuning._versions(), "decisions": {
        key: {"backend": "cpp", "times_us": {"cpp": 1.0, "torch": 2.0}, "excluded": {}, "spent_s": 0.0}}}))
    code = ("import torch, fastlora; w = fastlora.quantize_nf4(torch.randn(64, 128)); "
            "print(fastlora.dequantize_nf4(w).shape)")
    env = {**os.environ, "FASTLORA_TUNE": "1", "FASTLORA_TUNING_CACHE": str(tuned)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(tuned.read_text())["decisions"][key]["times_us"] == {"cpp": 1.0, "torch": 2.0}  # kept
    stale_key = f"{OP}|{tuning._device_name('cpu')}|float32|2**7"
    tuned.write_text(json.dumps({"versions": tuning._versions(), "decisions": {
        stale_key: {"backend": "cuda", "times_us": {"cuda": 1.0}, "excluded": {}, "spent_s": 0.0}}}))
    tuning._TUNERS.clear()
    assert _choose(_probe(slow=("torch",))) is Backend.CPP  # cuda cannot run here: measured again


def test_env_lists_the_measured_choices(tuned):
    from fastlora.env import collect, format_report

    _choose(_probe(slow=("torch",)))
    report = collect("cpu")
    (key, decision), = report["tuning"]["decisions"].items()
    assert key.startswith(f"{OP}|cpu:") and decision["backend"] == "cpp"
    assert set(decision["times_us"]) == {"cpp", "torch"}
    assert f"{key}  ->  cpp" in format_report(report)


def test_fastlora_tune_measures_a_models_shapes_ahead_of_a_run(tuned, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from fastlora.cli import main

    assert main(["tune", "--config", "tiny", "--seq-len", "16", "--batch-size", "2", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    decisions = tuning.tuner().decisions()
    assert decisions and any(k.startswith("nf4_dequantize|") for k in decisions)
    assert f"{len(decisions)} new decisions" in out and "nf4_dequantize|" in out
    monkeypatch.setenv("FASTLORA_TUNE", "0")
    assert main(["tune", "--config", "tiny"]) == 2


def _variant_probe(slow=(), wrong=(), calls=None):
    """A variant run function: every variant returns the same tensor (``wrong`` ones a different one) and draws
    from torch's RNG; ``slow`` ones take 2 ms more."""
    def run(v):
        if calls is not None:
            calls.append(v)
        torch.rand(3)  # as a dropout would
        if v in slow:
            time.sleep(0.002)
        return torch.arange(8.0) * (3 if v in wrong else 2)

    return run


def _choose_variant(run, variants=("static", "other"), **kwargs):
    return tuning.choose_variant("probe.train", torch.device("cpu"), torch.float32, "2**4x8", list(variants), run,
                                 tuning.close_max(torch.float32), **kwargs)


def test_the_faster_variant_wins_and_the_rng_is_left_as_it_was(tuned):
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    assert _choose_variant(_variant_probe(slow=("static",))) == "other"
    assert torch.equal(torch.rand(4), expected)  # measuring drew numbers, on a forked RNG
    (m,) = tuning.tuner().decisions().values()
    assert m.times_us["static"] > 2000 > m.times_us["other"]


def test_a_wrong_variant_is_excluded_and_the_static_one_runs_when_nothing_may_be_measured(tuned, monkeypatch,
                                                                                           caplog):
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        assert _choose_variant(_variant_probe(slow=("static",), wrong=("other",))) == "static"
    assert any("other excluded" in r.getMessage() for r in caplog.records)
    calls = []
    run = _variant_probe(slow=("static",), calls=calls)
    assert _choose_variant(run, variants=("a", "b"), tune=False) == "a"  # an explicit backend: never tuned
    monkeypatch.setenv("FASTLORA_TUNE", "0")
    assert _choose_variant(run, variants=("c", "d")) == "c"
    assert calls == []


@pytest.mark.parametrize("op", ["lora_linear", "lora_qkv"])
def test_layer_ops_measure_their_variants_in_training(tuned, op):
    """bf16 activations with fp32 adapters can run the LoRA branch in either dtype: both are timed (forward and
    backward) after agreeing, and the call runs the faster one, with the gradients it gives."""
    import importlib

    ops = importlib.import_module(f"fastlora.ops.{'lora' if op == 'lora_linear' else op}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g).bfloat16().requires_grad_(True)
    sizes = (16,) if op == "lora_linear" else (16, 8, 8)
    w = [torch.randn(n, 32, generator=g).bfloat16() for n in sizes]
    A = [torch.randn(4, 32, generator=g).requires_grad_(True) for _ in sizes]
    B = [torch.randn(n, 4, generator=g).requires_grad_(True) for n in sizes]

    def step():
        for t in (x, *A, *B):
            t.grad = None
        if op == "lora_linear":
            y = (fastlora.lora_linear(x, w[0], A[0], B[0], 2.0),)
        else:
            y = fastlora.lora_qkv(x, w, A, B, [2.0] * 3)
        sum(t.float().sum() for t in y).backward()
        return [t.detach() for t in y] + [t.grad for t in (x, *A, *B)]

    got = step()
    (key, m), = tuning.tuner().decisions().items()
    assert key.startswith(f"{op}.train|") and set(m.times_us) == {"dense", "fp32_branch"} and not m.excluded
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "_variant", lambda *args: m.backend)
        want = step()
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_rope_the_mlp_and_the_loss_are_measured_against_the_original_on_a_cpu(tuned):
    """With tuning on, a CPU no longer leaves RoPE and the fused MLP out by a rule measured once: each patched
    module measures fastlora's way against the original on its own shapes (forward and backward), runs the faster
    one, and says which in its coverage; so does the fused loss against the logits (a small vocabulary: they fit
    in one fused chunk). The model's loss and LoRA gradients stay those of the unpatched model."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from fastlora.testing import peft_lora_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    model = peft_lora_model(LlamaForCausalLM(config))
    patched = copy.deepcopy(model)
    report = fastlora.patch(patched)
    assert not {"rope", "mlp"} & {name for name, _ in report.skipped}
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for m in (model, patched):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    decisions = tuning.tuner().decisions()
    measured = {k.split("|")[0]: m for k, m in decisions.items()}
    assert set(measured["rope.train"].times_us) == {"fastlora", "transformers"}
    assert set(measured["lora_mlp.train"].times_us) == {"fused", "layers"}
    assert set(measured["fused_linear_cross_entropy.train"].times_us) == {"fused_linear", "logits"}
    cov = {c.op: c for c in fastlora.patching.coverage(patched).modules if c.op in ("apply_rope", "lora_mlp", "loss")}
    for op, key in (("apply_rope", "rope.train"), ("lora_mlp", "lora_mlp.train"),
                    ("loss", "fused_linear_cross_entropy.train")):
        original = measured[key].backend in ("transformers", "layers", "logits")
        counted = cov[op].measured if original else cov[op].ran
        assert sum(counted.values()) == 1, (op, cov[op])  # the model's one call; the measuring's are not counted
    assert not fastlora.patching.coverage(patched).never_ran()


def test_compile_traces_the_static_variant_and_measures_nothing(tuned):
    """torch.compile(fullgraph=True) of a layer op with several variants: the static one is traced (no context
    variable, no timing inside a graph) and no decision is made."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g).bfloat16()
    w = torch.randn(16, 32, generator=g).bfloat16()
    a = torch.randn(4, 32, generator=g).requires_grad_(True)
    b = torch.randn(16, 4, generator=g).requires_grad_(True)
    compiled = torch.compile(lambda t: fastlora.lora_linear(t, w, a, b, 2.0), fullgraph=True, backend="aot_eager")
    compiled(x).float().sum().backward()
    assert a.grad is not None and b.grad is not None
    assert tuning.tuner().decisions() == {}


def test_the_variant_check_takes_another_summation_order_but_not_garbage():
    """fp32 results summed in another order (the loss on the logits against the fused loss differs so, beyond a few
    fp32 ulps) pass the variants' check; an error of a percent of the largest magnitude, or a NaN, does not."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 4096, generator=g), torch.randn(4096, 64, generator=g)
    ref = a @ b
    other = sum(a[:, i:i + 512] @ b[i:i + 512] for i in range(4096 - 512, -1, -512))  # another order
    assert not torch.equal(other, ref)
    same = tuning.close_max(torch.float32)
    assert same((other,), (ref,))
    # As the fused loss's dX differs from the logits path's at a Llama model's last hidden state (measured 1.2e-6 of
    # the largest magnitude): ten fp32 ulps, beyond 8.
    shifted = ref.clone()
    shifted[3, 5] += 10 * torch.finfo(torch.float32).eps * float(ref.abs().max())
    assert same((shifted,), (ref,))
    broken = ref.clone()
    broken[3, 5] += 0.01 * float(ref.abs().max())
    assert not same((broken,), (ref,))
    assert not same((ref * float("nan"),), (ref,))


def test_off_measures_nothing_in_its_context_only(tuned):
    """tuning.off() (the planner's meta-device step) keeps the static choice inside, without touching the process
    environment; outside, and in another thread meanwhile, measuring goes on."""
    calls = []
    seen = {}
    with tuning.off():
        assert _choose_variant(_variant_probe(slow=("static",), calls=calls)) == "static"
        assert calls == [] and os.environ["FASTLORA_TUNE"] == "1"
        worker = threading.Thread(target=lambda: seen.update(enabled=tuning.enabled()))
        worker.start()
        worker.join()
    assert seen == {"enabled": True}
    assert _choose_variant(_variant_probe(slow=("static",))) == "other"
