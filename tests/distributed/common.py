"""What the distributed workers share: the tiny model, the per-rank batches, and how a run is recorded.

Every rank builds the same model from the same seed (DDP and FSDP2 need identical replicas to start from) and
trains on its own batches, so that the reduction across ranks changes the gradients.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

VOCAB = 101  # odd on purpose, as in tests/test_patch.py
LR = 0.1
STEPS = 2


def rank_and_world() -> tuple[int, int]:
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def setup() -> None:
    """One thread per rank (two ranks share two cores: torch's per-core OpenMP threads would stall each other), and
    fastlora's allocations NaN-poisoned as in the test process (tests/conftest.py), so an unwritten output fails."""
    import fastlora.kernels._utils as kernel_utils

    torch.set_num_threads(1)
    kernel_utils.POISON = True


def llama(*, intermediate_size: int = 96, dropout: float = 0.0, base: Callable | None = None) -> torch.nn.Module:
    """A PEFT LoRA Llama of tests/test_patch.py's size (hidden 64, 2 layers, 4 heads over 2 kv heads), fp32, the
    same on every rank. ``base`` changes the transformers model before PEFT wraps it (a 4-bit decoder: then
    ``intermediate_size`` 128, as bitsandbytes' CPU dequantize needs whole blocks of 64 per row)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastlora.testing import peft_lora_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    model = LlamaForCausalLM(config).float()
    if base is not None:
        model = base(model)
    return peft_lora_model(model, dropout=dropout)


def batch(rank: int, step: int, rows: int = 2, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``step``: different on each rank, with some labels ignored."""
    g = torch.Generator().manual_seed(1000 * rank + step + 1)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, : 2 + rank + step] = -100
    return ids, labels


def lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by name (names without DDP's ``module.`` prefix: pass the inner model)."""
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert params and all(p.requires_grad for p in params.values())
    return params


def full(t: torch.Tensor) -> torch.Tensor:
    """A detached full copy: FSDP2's sharded DTensors are gathered (a collective: every rank calls it in turn)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def coverage_summary(model: torch.nn.Module) -> dict:
    """What the test asserts on from ``fastlora.patching.coverage``, as plain data (torch.save, weights_only)."""
    import fastlora

    cov = fastlora.patching.coverage(model)
    return {"modules": len(cov.modules), "never_ran": [f"{c.name} ({c.op})" for c in cov.never_ran()],
            "ran": dict(cov.ran()), "fell_back": dict(cov.fell_back()), "table": str(cov)}


def log(*args: object) -> None:
    print(f"[rank {os.environ.get('RANK', '?')}]", *args, file=sys.stderr, flush=True)
