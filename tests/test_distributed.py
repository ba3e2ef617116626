"""Distributed training on 2 CPU processes over gloo: DDP (without checkpointing, and with fastlora's offloaded
checkpointing, reentrant and not), FSDP2 (dense LoRA, and QLoRA with bf16 quant storage), HF Trainer under torchrun
and accelerate's multi-process CPU launch. In each, the patched model trains as the unpatched one: losses, LoRA
gradients after the reduction and the adapters' updates are within twice the unpatched model's error against the
same run in fp64 (DESIGN.md's rule), and coverage shows fastlora's ops ran in every patched module, on every call.

The workers in tests/distributed/ run in subprocesses and save what each rank saw; the assertions run here. A launch
costs ~15 s, most of it starting 2 processes that import torch, transformers and PEFT, so one torchrun launch runs
every DDP and FSDP2 case, and the Trainer and accelerate get a launch each because their launcher is the point.
One test per launch: under pytest-xdist a fixture shared by several tests could run the launch once per worker.
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastlora.testing import assert_close_to_reference, assert_pooled_close_to_reference

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
pytest.importorskip("peft")
pytest.importorskip("transformers")

WORKERS = Path(__file__).parent / "distributed"
TIMEOUT_S = 300  # a launch takes ~15-20 s alone on 2 cores; a hung rendezvous or collective must not hang CI
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LAYERS = 2  # decoder layers of the workers' tiny Llama
LORA_TENSORS = 2 * 7 * LAYERS  # A and B of 7 LoRA layers in each
FSDP_MODULES = ["", "base_model.model", "base_model.model.model.layers.0", "base_model.model.model.layers.1"]


def _launch(command: list[str], out: Path, prefix: str, **env: str) -> list[dict]:
    """Run a 2-process launch to completion and load what each rank saved (``{prefix}_rank{r}.pt``). The launch
    gets its own session, so that a timeout kills its workers too, not only the launcher."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning", **env}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{prefix} launch timed out after {TIMEOUT_S} s; its output:\n{output[-20000:]}")
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        pytest.fail(f"{prefix} launch failed (exit {proc.returncode}) after {elapsed:.0f} s; its output:\n"
                    f"{output[-20000:]}")
    print(f"{prefix} launch: {elapsed:.1f} s")
    return [torch.load(out / f"{prefix}_rank{rank}.pt", weights_only=True) for rank in range(2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(run: dict) -> list[torch.Tensor]:
    return [g for step in run["grads"] for _, g in sorted(step.items())]


def _updates(run: dict) -> list[torch.Tensor]:
    return [u for _, u in sorted(run["update"].items())]


def _max_relative_difference(run: dict, other: dict) -> float:
    """The largest difference of any loss, gradient or update, relative to the largest element of its tensor."""
    pairs = zip([run["losses"], *_grads(run), *_updates(run)], [other["losses"], *_grads(other), *_updates(other)],
                strict=True)
    return max(float((a.double() - b.double()).abs().max() / b.double().abs().max()) for a, b in pairs)


def _trains_alike(runs: dict, yardstick: str, what: str, steps: int) -> None:
    """The patched run within twice the ``yardstick`` run's error against the fp64 run (DESIGN.md's rule): losses
    per micro-batch elementwise (4 ulps floor, as tests/test_patch.py), gradients and updates normwise over all
    tensors (single elements' errors swing several-fold from batch to batch for either model)."""
    got, exact, theirs = runs["patched"], runs["fp64"], runs[yardstick]
    for run in (got, exact, theirs):
        assert len(run["grads"]) == steps and all(len(g) == LORA_TENSORS for g in run["grads"]), what
        assert sorted(run["update"]) == sorted(exact["update"]) == sorted(exact["grads"][0]), what
    assert_close_to_reference(got["losses"], exact["losses"], theirs["losses"], ulps=4, name=f"{what}: losses")
    assert_pooled_close_to_reference(_grads(got), _grads(exact), _grads(theirs), name=f"{what}: LoRA gradients")
    assert_pooled_close_to_reference(_updates(got), _updates(exact), _updates(theirs),
                                      name=f"{what}: adapter updates")


def _ranks_in_sync(ranks: list[dict], what: str) -> None:
    """DDP's all-reduce gave both ranks the same gradients, hence the same updates, though each rank had its own
    batches (its own losses)."""
    r0, r1 = ranks
    assert not torch.equal(r0["losses"], r1["losses"]), f"{what}: both ranks trained on the same batches"
    for a, b in zip(_grads(r0) + _updates(r0), _grads(r1) + _updates(r1), strict=True):
        assert torch.equal(a, b), f"{what}: the ranks' gradients differ (not all-reduced)"


def _ran_everywhere(coverage: dict, what: str, *, forwards: int, recomputed: bool = False) -> None:
    """Every patched module ran fastlora's ops on every call, nothing fell back: per forward (and per recompute
    under checkpointing) 4 lora_linear and 1 lora_qkv per decoder layer, and the fused loss once per forward."""
    per_forward = 2 if recomputed else 1
    assert coverage["modules"] == 17, coverage["table"]  # 14 LoRA layers, 2 attentions, the loss
    assert coverage["never_ran"] == [], f"{what}: never ran fastlora's ops:\n{coverage['table']}"
    assert coverage["fell_back"] == {}, f"{what}: fell back:\n{coverage['table']}"
    assert coverage["ran"] == {"lora_linear": 8 * forwards * per_forward, "lora_qkv": 2 * forwards * per_forward,
                               "fused_linear_cross_entropy": forwards}, f"{what}:\n{coverage['table']}"


def _offloaded(run: dict, what: str, *, forwards: int) -> None:
    """Offloaded checkpointing copied each checkpointed layer's input but the newest (kept on the device) out, and
    the backward got every copy back."""
    assert run["offloaded"] == forwards * (LAYERS - 1), f"{what}: {run['offloaded']} offloaded"
    assert run["fetched"] == run["offloaded"], f"{what}: {run['fetched']} fetched of {run['offloaded']}"


def test_ddp_and_fsdp2_under_torchrun(tmp_path):
    """DDP (static_graph for reentrant checkpointing) and FSDP2 (each decoder layer, the transformers model and the
    root sharded, the model patched before), 2 SGD steps. Also: the fp64 run matches fp64 training on both ranks'
    batches in one process (the reduction averaged them); under FSDP2 every parameter is a DTensor shard, QLoRA's
    4-bit weights stay bf16 storage, and after ``unpatch`` FSDP2's modules are still FSDP2's (its classes were put
    on top of fastlora's), ``reshard()`` works and a step runs the original code: logits again, no fastlora call,
    the loss of the unpatched run."""
    cases = ["ddp", "ddp_offload_reentrant", "ddp_offload_non_reentrant", "fsdp2"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        cases.append("fsdp2_qlora")
    ranks = _launch([*TORCHRUN, str(WORKERS / "torchrun_worker.py"), str(tmp_path), *cases], tmp_path, "torchrun")
    for case in cases:
        for rank, results in enumerate(ranks):
            what = f"{case}, rank {rank}"
            runs = results[case]
            local, exact = runs["fp64_local"], runs["fp64"]
            for got, want in zip([exact["losses"], *_grads(exact), *_updates(exact)],
                                 [local["losses"], *_grads(local), *_updates(local)], strict=True):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12,
                                           msg=f"{what}: fp64 gradients not averaged over the ranks")
            # A 4-bit model's yardstick is its fp32 twin, as in tests/test_patch.py: bitsandbytes' CPU kernels
            # compute in other orders on other CPUs (on this one its unpatched run equals the twin).
            yardstick = "fp32" if case == "fsdp2_qlora" else "unpatched"
            _trains_alike(runs, yardstick, what, steps=2)
            patched = runs["patched"]
            _ran_everywhere(patched["coverage"], what, forwards=2, recomputed="offload" in case)
            if "offload" in case:
                _offloaded(patched, what, forwards=2)
            if case.startswith("fsdp2"):
                assert patched["sharded"], f"{what}: not every parameter is a DTensor"
                assert patched["base_dtypes"] == (["torch.bfloat16"] if case == "fsdp2_qlora" else ["torch.float32"])
                assert patched["fsdp_before"] == patched["fsdp_after"] == FSDP_MODULES, what
                assert patched["fastlora_classes_left"] == [], what
                assert patched["logits_after"] and patched["calls_after_unpatch"] == 0, what
                assert_close_to_reference(patched["loss_after"], runs["fp64"]["loss_after"],
                                          runs[yardstick]["loss_after"], ulps=4, name=f"{what}: loss after unpatch")
            print(f"{what}: patched vs unpatched {_max_relative_difference(patched, runs['unpatched']):.1e}")
        if case.startswith("ddp"):
            _ranks_in_sync([r[case]["patched"] for r in ranks], case)


def test_hf_trainer_under_torchrun(tmp_path):
    """HF Trainer with FastLoRACallback(checkpointing=offload) under torchrun: DDP over gloo, checkpointing turned on
    by the Trainer after the patch, 2 micro-batches accumulated per step, LoRA dropout on. Against the same Trainer
    run unpatched and in fp64."""
    ranks = _launch([*TORCHRUN, str(WORKERS / "trainer_worker.py"), str(tmp_path)], tmp_path, "trainer")
    for rank, runs in enumerate(ranks):
        what = f"Trainer, rank {rank}"
        assert {r["wrapper"] for r in runs.values()} == {"DistributedDataParallel"}, what
        assert {r["world_size"] for r in runs.values()} == {2}, what
        assert len(runs["patched"]["losses"]) == 4, what  # 2 steps x 2 micro-batches
        _trains_alike(runs, "unpatched", what, steps=2)
        _ran_everywhere(runs["patched"]["coverage"], what, forwards=4, recomputed=True)
        _offloaded(runs["patched"], what, forwards=4)
        print(f"{what}: patched vs unpatched {_max_relative_difference(runs['patched'], runs['unpatched']):.1e}")
    _ranks_in_sync([r["patched"] for r in ranks], "Trainer")


def test_accelerate_launch_on_two_cpu_processes(tmp_path):
    """``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`` (``--cpu`` would start one
    process): ``accelerator.prepare`` wraps the patched model in DDP, ``accumulate`` over 2 micro-batches, dropout
    on. Against the same loop unpatched and in fp64."""
    pytest.importorskip("accelerate")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), str(WORKERS / "accelerate_worker.py"), str(tmp_path)]
    ranks = _launch(launch, tmp_path, "accelerate", ACCELERATE_USE_CPU="true")
    for rank, runs in enumerate(ranks):
        what = f"accelerate, rank {rank}"
        state = runs.pop("state")
        assert state["distributed_type"] == "DistributedType.MULTI_CPU" and state["num_processes"] == 2, state
        assert {r["wrapper"] for r in runs.values()} == {"DistributedDataParallel"}, what
        _trains_alike(runs, "unpatched", what, steps=2)
        _ran_everywhere(runs["patched"]["coverage"], what, forwards=4)
        gathered = runs["patched"]["gathered_losses"]  # accelerator.gather: both ranks' losses, rank by rank
        assert torch.equal(gathered, torch.cat([r["patched"]["losses"] for r in ranks])), what
        print(f"{what}: patched vs unpatched {_max_relative_difference(runs['patched'], runs['unpatched']):.1e}")
    _ranks_in_sync([r["patched"] for r in ranks], "accelerate")
