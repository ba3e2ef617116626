"""torchrun worker of tests/test_distributed.py: HF Trainer on 2 CPU processes (DDP over gloo), patched by
FastLoRACallback, against the same Trainer run unpatched and in fp64.

The Trainer makes its own process group, sampler and DDP wrapper, turns checkpointing on inside ``train()`` (after
the callback patched the model: fastlora must take it over then), accumulates 2 micro-batches per step (DDP skips
the all-reduce of the first) and draws LoRA dropout masks from its seeded RNG. Each rank saves every micro-batch's
loss, the LoRA gradients the optimizer applies (after DDP's all-reduce), the adapters' updates and the coverage.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 trainer_worker.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import LR, VOCAB, coverage_summary, llama, log, lora_params, rank_and_world, setup
from transformers import Trainer, TrainerCallback, TrainingArguments

from fastlora.checkpointing import OffloadedCheckpointing, trainer_checkpointing_args
from fastlora.integrations import FastLoRACallback
from fastlora.testing import torch_twin


def rows(n: int = 16) -> list[dict]:
    """2 steps x 2 micro-batches x 2 rows x 2 ranks, with different numbers of counted tokens per micro-batch."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (9,), generator=g)
        labels = ids.clone()
        labels[: i % 5] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


class Record(TrainerCallback):
    """The LoRA gradients the optimizer is about to apply, step by step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.grads.append({n: p.grad.detach().clone() for n, p in lora_params(model).items()})


def run(variant: str, out_dir: Path) -> dict:
    """One Trainer run of the model in ``variant`` (fp64, unpatched, patched); what this rank saw."""
    model = llama(dropout=0.1)
    if variant == "fp64":
        model = torch_twin(model)
    initial = {n: p.detach().clone() for n, p in lora_params(model).items()}
    losses: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, args, out: losses.append(out.loss.detach().clone()))
    record = Record()
    callbacks = [record]
    if variant == "patched":
        # Offloading CPU tensors too: nothing is saved on a CPU, but the copies and the fetch in the backward run.
        offload = OffloadedCheckpointing(offload_device_types=("cuda", "cpu"), min_offload_bytes=0,
                                         pin_memory=False)
        callbacks.append(FastLoRACallback(checkpointing=offload))
    # SGD without clipping, as tests/test_integrations.py: AdamW's first step moves every weight by about the
    # learning rate whatever the gradient's rounding, and clipping rescales it.
    args = TrainingArguments(output_dir=str(out_dir / variant), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, optim="sgd", learning_rate=LR, max_grad_norm=0.0,
                             save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo", seed=3,
                             dataloader_num_workers=0, disable_tqdm=True, **trainer_checkpointing_args())
    trainer = Trainer(model=model, args=args, train_dataset=rows(), callbacks=callbacks)
    trainer.train()
    out = {"losses": torch.stack(losses), "grads": record.grads,
           "update": {n: p.detach() - initial[n] for n, p in lora_params(model).items()},
           "world_size": trainer.args.world_size, "wrapper": type(trainer.model_wrapped).__name__}
    if variant == "patched":
        out["coverage"] = coverage_summary(model)
        out["offloaded"] = offload.stats.offloaded
        out["fetched"] = offload.stats.fetched + offload.stats.prefetched
    return out


def main() -> None:
    setup()
    out_dir = Path(sys.argv[1])
    rank, _ = rank_and_world()
    results = {v: run(v, out_dir) for v in ("fp64", "unpatched", "patched")}
    log("trainer done")
    torch.save(results, out_dir / f"trainer_rank{rank}.pt")


if __name__ == "__main__":
    main()
