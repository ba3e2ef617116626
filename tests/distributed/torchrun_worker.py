"""torchrun worker of tests/test_distributed.py: DDP and FSDP2 on 2 CPU processes over gloo, in one launch.

Starting the processes and importing torch, transformers and PEFT costs seconds, so every case runs here:
DDP without checkpointing and with fastlora's offloaded checkpointing (reentrant, which DDP only takes with
``static_graph=True``, and non-reentrant), and FSDP2 over dense LoRA and over QLoRA (NF4 stored as bf16, the
FSDP-QLoRA recipe). In each case the same seeded model trains 2 SGD steps on each rank's own batches, in variants:
its fp64 twin (the reference errors are measured against), the same trained in this process alone on both ranks'
batches (the distributed fp64 run must match it), the fp32 twin of a 4-bit model (PyTorch's own fp32 computation of
it, the tolerance rule's yardstick), the unpatched model and the patched one (patched before it is wrapped or
sharded). Each rank saves what the test asserts on: losses, the LoRA gradients after the reduction (FSDP2's gathered
with ``full_tensor``), the adapters' updates, coverage, and how FSDP2 fares after ``unpatch``.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 torchrun_worker.py OUT_DIR [CASE ...]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from common import LR, STEPS, batch, coverage_summary, full, llama, log, lora_params, rank_and_world, setup
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

import fastlora
from fastlora.checkpointing import OffloadedCheckpointing, enable_checkpointing
from fastlora.testing import torch_twin

CASES = {
    "ddp": dict(wrap="ddp"),
    "ddp_offload_reentrant": dict(wrap="ddp", checkpointing="reentrant"),
    "ddp_offload_non_reentrant": dict(wrap="ddp", checkpointing="non-reentrant"),
    "fsdp2": dict(wrap="fsdp2"),
    "fsdp2_qlora": dict(wrap="fsdp2", four_bit=True),
}


def nf4_bf16_storage(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder's linear layers as bitsandbytes NF4 ``Linear4bit`` whose packed bytes are stored as bf16
    (``bnb_4bit_quant_storage=torch.bfloat16``, what FSDP-QLoRA loads), with the quantization state also kept on
    the layer, where bitsandbytes and fastlora find it once FSDP2 has replaced the ``Params4bit``. bitsandbytes'
    CPU repack stays off (see fastlora.testing.nf4_decoder)."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4",
                                          quant_storage=torch.bfloat16, device="cpu")
                    q.support_avx512bf16_for_cpu = False
                    q.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False, quant_type="nf4",
                                                 quant_storage=torch.bfloat16, module=q)
                    setattr(parent, name, q.to("cpu"))  # quantizes, and sets q.quant_state through module=q
    model.is_loaded_in_4bit = True
    return model


def shard(model: torch.nn.Module) -> None:
    """FSDP2 as its docs recipe: each decoder layer, then the root. The transformers model inside the PeftModel is
    sharded too: it is a module whose class fastlora swapped (the fused loss), so FSDP2 puts its class on top of
    fastlora's, and ``unpatch`` must keep that one."""
    hf = model.get_base_model()
    for layer in hf.model.layers:
        fully_shard(layer)
    fully_shard(hf)
    fully_shard(model)


def run(case: dict, variant: str, rank: int) -> dict:
    """Train the case's model in one variant on this rank's batches; what it did."""
    model = llama(intermediate_size=128, base=nf4_bf16_storage) if case.get("four_bit") else llama()
    if variant in ("fp64", "fp64_local", "fp32"):
        model = torch_twin(model, torch.float32 if variant == "fp32" else torch.float64)
    model.train()
    if variant == "fp64_local":
        # Alone on both ranks' batches, averaging their losses as DDP and FSDP2 average the gradients: the
        # distributed fp64 run must match it, so the reduction really happened.
        def both(ids: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            per_rank = [model(input_ids=i, labels=t).loss for i, t in (batch(r, step) for r in range(2))]
            return sum(per_rank) / 2, per_rank[rank]

        return train(lora_params(model), both, rank)
    checkpointing = case.get("checkpointing")
    if checkpointing:
        enable_checkpointing(model, use_reentrant=checkpointing == "reentrant")
        model.enable_input_require_grads()  # frozen embeddings: the reentrant checkpoint needs an input with grad
    report = offload = None
    if variant == "patched":
        if checkpointing:
            # Offloading CPU tensors too: nothing is saved on a CPU, but the copies and the fetch in the backward run.
            offload = OffloadedCheckpointing(offload_device_types=("cuda", "cpu"), min_offload_bytes=0,
                                             pin_memory=False)
        report = fastlora.patch(model, checkpointing=offload)
    initial = {n: full(p) for n, p in lora_params(model).items()}
    if case["wrap"] == "ddp":
        runner = DistributedDataParallel(model, static_graph=checkpointing == "reentrant")
    else:
        shard(model)
        runner = model

    def own(ids: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        loss = runner(input_ids=ids, labels=labels).loss
        return loss, loss

    out = train(lora_params(model), own, rank, initial)  # after fully_shard, whose DTensor parameters replace them
    if report is not None:
        out["coverage"] = coverage_summary(model)
        if offload is not None:
            out["offloaded"] = offload.stats.offloaded
            out["fetched"] = offload.stats.fetched + offload.stats.prefetched
    if case["wrap"] == "fsdp2":
        out["sharded"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
        out["base_dtypes"] = sorted({str(p.dtype) for n, p in model.named_parameters()
                                     if n.endswith("base_layer.weight")})
        if report is not None:
            calls = sum(c.calls for c in report.counters)
            out.update(unpatch_sharded(model))
        out.update(one_more_step(model, rank))
        if report is not None:
            out["calls_after_unpatch"] = sum(c.calls for c in report.counters) - calls
    return out


def train(params: dict[str, torch.nn.Parameter], loss_of: Callable, rank: int,
          initial: dict[str, torch.Tensor] | None = None) -> dict:
    """``STEPS`` SGD steps; ``loss_of(ids, labels, step)`` gives the loss to backpropagate and this rank's loss.
    Returns the rank's losses, the gradients after the reduction (full tensors) and the adapters' updates."""
    initial = initial or {n: full(p) for n, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        loss, mine = loss_of(*batch(rank, step), step)
        loss.backward()
        losses.append(mine.detach().clone())
        grads.append({n: full(p.grad) for n, p in params.items()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"losses": torch.stack(losses), "grads": grads,
            "update": {n: full(p) - initial[n] for n, p in params.items()}}


def unpatch_sharded(model: torch.nn.Module) -> dict:
    """Unpatch the sharded model: FSDP2's modules must stay FSDP2's (its classes were put on top of fastlora's) and
    no class of fastlora's may be left."""
    before = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    assert fastlora.unpatch(model)
    after = sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))
    leftovers = sorted(n for n, m in model.named_modules()
                       if any("_fastlora_original" in vars(c) for c in type(m).__mro__))
    return {"fsdp_before": before, "fsdp_after": after, "fastlora_classes_left": leftovers}


def one_more_step(model: torch.nn.Module, rank: int) -> dict:
    """After training (and, for the patched model, ``unpatch``): ``reshard()`` and a forward and backward on the first
    batch. An unpatched model computes the logits again (the fused loss makes none) and the loss of the unpatched
    run, trained alike."""
    model.reshard()
    output = model(input_ids=batch(rank, 0)[0], labels=batch(rank, 0)[1])
    output.loss.backward()
    model.reshard()
    return {"logits_after": output.logits is not None, "loss_after": output.loss.detach()}


def main() -> None:
    setup()
    out_dir = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    dist.init_process_group("gloo")
    rank, world = rank_and_world()
    assert world == 2
    results = {}
    for name in names:
        case = CASES[name]
        start = time.perf_counter()
        variants = ["fp64_local", "fp64"] + (["fp32"] if case.get("four_bit") else []) + ["unpatched", "patched"]
        results[name] = {v: run(case, v, rank) for v in variants}
        log(f"{name}: {time.perf_counter() - start:.1f} s")
    torch.save(results, out_dir / f"torchrun_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
