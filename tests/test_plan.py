"""fastlora.plan: a training step planned on meta tensors against the same step measured on the CPU, and the
planner's figures for real model shapes against what can be computed by hand."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402

from fastlora.plan import AllocationTracker, load_config, plan  # noqa: E402
from fastlora.plan.devices import find_gpu  # noqa: E402

MiB = 2**20


def tiny_config(**changes: object) -> LlamaConfig:
    # Sizes chosen so that no single tensor dominates: the peak moves between the loss, the attention and the MLP
    # with the settings. Linear widths are whole NF4 blocks (REFERENCE.md: bnb's CPU dequant quirk otherwise).
    values = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=640, max_position_embeddings=4096)
    values.update(changes)
    return LlamaConfig(**values)


def test_tracker_on_real_tensors_matches_the_allocator():
    t = AllocationTracker("cpu")
    with t:
        a = torch.ones(1024, 256)        # 1 MiB
        b = a * 2                        # 2 MiB live
        view = b[:10]
        del a, b                         # b's storage lives on through the view
        c = torch.zeros(512, 256)        # 0.5 MiB
    assert t.peak.bytes == 2 * MiB
    assert t.live == MiB + MiB // 2
    del view
    assert t.live == MiB // 2
    del c
    assert t.live == 0


def test_tracker_tags_and_host_memory():
    t = AllocationTracker("meta")
    w = torch.empty(256, device="meta")
    t.tag(w, "weights")
    with t:
        x = torch.empty(1024, device="meta")
        host = torch.empty(2048, device="meta")
    t.to_host(host)
    assert t.live == 1024 + 4096 and t.host_bytes == 8192
    assert t.peak_by_tag() == {"weights": 1024, "": 4096 + 8192}
    del x, host
    assert t.live == 1024 and t.host_bytes == 0


# dense / NF4, patched / unpatched, checkpointing off / standard: the plan (meta) against the step run for real.
CASES = [dict(quant=q, patched=p, checkpointing=c) for q in (None, "nf4") for p in (True, False)
         for c in (None, "standard")]


# Two shapes: one whose peak is at the loss (vocabulary 5x hidden), one whose peak is in the decoder's backward.
SHAPES = {"loss-heavy": (dict(), 96), "decoder-heavy": (dict(vocab_size=64, intermediate_size=1024), 256)}


def _case_id(case: dict) -> str:
    return "-".join(str(v) for v in case.values())


# Planned and measured in a fresh interpreter, as a training run starts. In a process where tests/test_nf4.py's
# bitsandbytes dequantize cases ran first, both the plan and the real step change (e.g. 4.06 -> 4.53 MB planned,
# 3.13 MB measured): a state neither models yet (issue 17), which made this test depend on the test order.
_PLAN_AND_MEASURE = """
import json, sys, torch
from transformers import LlamaConfig
from fastlora.plan import plan
from fastlora.plan.check import measure_cpu_step
out = {}
for key, (values, seq_len, case) in json.loads(sys.argv[1]).items():
    config = LlamaConfig(**values)
    p = plan(config, batch=2, seq_len=seq_len, rank=8, device="cpu", dtype=torch.float32, **case)
    m = measure_cpu_step(config, batch=2, seq_len=seq_len, rank=8, dtype=torch.float32, **case)
    out[key] = dict(planned=p.peak_bytes, overheads=p.overheads, breakdown=p.breakdown, tracker=m.tracker_peak,
                    allocator=m.allocator_peak, where=str(m.tracker.peak))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_steps() -> dict[str, dict]:
    import os
    import subprocess
    import sys

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings")
    jobs = {}
    for case in CASES:
        if case["quant"] and importlib.util.find_spec("bitsandbytes") is None:
            continue
        for shape, (changes, seq_len) in SHAPES.items():
            values = tiny_config(**changes).to_dict()
            jobs[f"{_case_id(case)}|{shape}"] = ({k: values[k] for k in keys}, seq_len, case)
    done = subprocess.run([sys.executable, "-c", _PLAN_AND_MEASURE, json.dumps(jobs)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cpu_plan_within_5_percent_of_the_measured_step(case, shape, fresh_steps):
    if case["quant"]:
        pytest.importorskip("bitsandbytes")
    got = fresh_steps[f"{_case_id(case)}|{shape}"]
    planned = got["planned"]
    # Same tracker, real tensors: the meta step allocates what the real one does.
    assert planned == pytest.approx(got["tracker"], rel=0.05), got
    # The CPU allocator's own count (torch profiler) sees inside kernels too: an independent measure.
    assert planned == pytest.approx(got["allocator"], rel=0.05), got
    assert got["overheads"] == {}
    assert got["breakdown"]["weights"] > 0 and got["breakdown"]["adapters"] > 0


def _expected_weights(config: object, nf4: bool, dtype_bytes: int = 2) -> int:
    """The frozen weights of a Llama model by hand: embeddings and head in the model dtype, norms, the decoder's
    linear layers dense or as NF4 (half a byte per weight, one uint8 absmax per 64, one fp32 per 256 blocks)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    total = 2 * config.vocab_size * h * dtype_bytes + (2 * n + 1) * h * dtype_bytes
    for out_f, in_f in shapes:
        numel = out_f * in_f
        if nf4:
            blocks = -(-numel // 64)
            total += n * ((numel + 1) // 2 + blocks + 4 * -(-blocks // 256) + 16 * 4 + 256 * 4 + 4)
        else:
            total += n * numel * dtype_bytes
    return total


def test_llama_8b_qlora_plan_on_h100():
    config = load_config("llama-3.1-8b")
    p = plan(config, batch=1, seq_len=2048, rank=16, quant="nf4", device="H100-80GB", search_max_seq_len=False)
    # The caching allocator's rounding only adds, a little.
    assert p.breakdown["weights"] >= _expected_weights(config, nf4=True)
    assert p.breakdown["weights"] < _expected_weights(config, nf4=True) * 1.01
    h, i, kv, r = 4096, 14336, 1024, 16
    adapters = 32 * r * 4 * sum(a + b for a, b in [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)])
    assert adapters <= p.breakdown["adapters"] < adapters * 1.01
    assert p.overheads["CUDA context"] == 500 * MiB and p.fits
    assert p.peak_bytes == sum(p.breakdown.values()) + sum(p.overheads.values())


def test_checkpointing_and_offload_lower_the_peak_and_offload_to_host():
    config = tiny_config(num_hidden_layers=4)
    # 8192 tokens: a layer input of 2 MiB, over OffloadedCheckpointing's 1 MiB minimum.
    kw = dict(batch=1, seq_len=8192, rank=8, device="A100-40GB", dtype=torch.bfloat16, search_max_seq_len=False)
    off, std, offload = (plan(config, checkpointing=c, **kw) for c in (None, "standard", "offload"))
    assert offload.peak_bytes < std.peak_bytes < off.peak_bytes
    # Offloaded: every checkpointed layer's input but the newest ([B, S, H] bf16 each) sits in host memory.
    assert offload.cpu_offload_bytes == 3 * 8192 * 128 * 2
    assert std.cpu_offload_bytes == 0


def test_gpu_attention_is_linear_in_sequence_length():
    # A GPU's flash attention keeps O(S) memory; meta's math path would make [B, H, S, S] scores.
    config = tiny_config(num_hidden_layers=1)
    peaks = [plan(config, batch=1, seq_len=s, rank=8, device="A100-80GB", patched=False, search_max_seq_len=False)
             .peak_bytes for s in (2048, 4096, 8192)]
    assert peaks[2] - peaks[1] == pytest.approx(2 * (peaks[1] - peaks[0]), rel=0.02)
    scores = 4 * 8192 * 8192 * 2
    assert peaks[2] - peaks[1] < scores


def test_max_seq_len_is_the_longest_that_fits():
    config = tiny_config(num_hidden_layers=2, max_position_embeddings=1 << 16)
    limit = 700 * MiB  # 500 MiB of it is the stated CUDA context
    p = plan(config, batch=1, seq_len=256, rank=8, device=limit, search_max_seq_len=True)
    assert 256 < p.max_seq_len < 1 << 16
    at = plan(config, batch=1, seq_len=p.max_seq_len, rank=8, device=limit, search_max_seq_len=False)
    over = plan(config, batch=1, seq_len=p.max_seq_len + 1, rank=8, device=limit, search_max_seq_len=False)
    assert at.fits and not over.fits


def test_configs_and_devices(tmp_path):
    assert load_config("meta-llama/Llama-3.1-8B").num_hidden_layers == 32
    assert load_config("llama-3-70b").hidden_size == 8192
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config().to_dict()))
    assert load_config(str(path)).vocab_size == 640
    assert load_config(str(tmp_path)).vocab_size == 640
    with pytest.raises(ValueError, match="known model"):
        load_config("no-such-model")
    assert find_gpu("t4").name == "T4-16GB"
    with pytest.raises(ValueError, match="unknown GPU"):
        find_gpu("a100")  # two of them
    with pytest.raises(ValueError, match="checkpointing"):
        plan(tiny_config(), checkpointing="yes")


def test_cli_plan_json(tmp_path, capsys):
    from fastlora.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config().to_dict()))
    assert main(["plan", "--config", str(path), "--gpu", "8GB", "--qlora", "--seq-len", "512", "--no-max",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "8GB" and out["fits"] is True and out["settings"]["quant"] == "nf4"
    assert out["peak_bytes"] == sum(out["breakdown"].values()) + sum(out["overheads"].values())
