"""``accelerate launch`` worker of tests/test_distributed.py: a custom loop on accelerate's 2-process CPU run.

``accelerate launch --cpu --num_processes 2`` starts one process; the test launches with ``ACCELERATE_USE_CPU=true
accelerate launch --multi_gpu --num_processes 2``, which gives 2 CPU processes over gloo (MULTI_CPU). The model and
optimizer go through ``accelerator.prepare`` (DDP), with 2 micro-batches accumulated per step
(``accelerator.accumulate``: no all-reduce on the first) and LoRA dropout on, seeded alike in every variant. Each
rank saves every micro-batch's loss, the LoRA gradients at each optimizer step, the adapters' updates and the
coverage, for the fp64 twin, the unpatched model and the patched one (patched before ``prepare``).

Usage: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 accelerate_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from common import LR, STEPS, batch, coverage_summary, llama, log, lora_params, setup

import fastlora
from fastlora.testing import torch_twin

MICRO_BATCHES = 2


def run(accelerator: Accelerator, variant: str) -> dict:
    """One training loop of the model in ``variant`` (fp64, unpatched, patched); what this rank saw."""
    model = llama(dropout=0.1)
    if variant == "fp64":
        model = torch_twin(model)
    model.train()
    if variant == "patched":
        fastlora.patch(model)
    initial = {n: p.detach().clone() for n, p in lora_params(model).items()}
    optimizer = torch.optim.SGD(lora_params(model).values(), lr=LR)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(10 + accelerator.process_index)  # the dropout masks: alike in every variant, not across ranks
    losses, grads = [], []
    for step in range(STEPS * MICRO_BATCHES):
        with accelerator.accumulate(wrapped):
            ids, labels = batch(accelerator.process_index, step)
            loss = wrapped(input_ids=ids, labels=labels).loss
            accelerator.backward(loss)
            losses.append(loss.detach().clone())
            if accelerator.sync_gradients:
                grads.append({n: p.grad.detach().clone() for n, p in lora_params(model).items()})
            optimizer.step()
            optimizer.zero_grad()
    out = {"losses": torch.stack(losses), "grads": grads,
           "update": {n: p.detach() - initial[n] for n, p in lora_params(model).items()},
           "gathered_losses": accelerator.gather(torch.stack(losses)), "wrapper": type(wrapped).__name__}
    if variant == "patched":
        out["coverage"] = coverage_summary(model)
    accelerator.free_memory()
    return out


def main() -> None:
    setup()
    out_dir = Path(sys.argv[1])
    accelerator = Accelerator(gradient_accumulation_steps=MICRO_BATCHES)
    results = {v: run(accelerator, v) for v in ("fp64", "unpatched", "patched")}
    results["state"] = {"distributed_type": str(accelerator.distributed_type), "device": str(accelerator.device),
                        "num_processes": accelerator.num_processes}
    log("accelerate done")
    torch.save(results, out_dir / f"accelerate_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
