"""One training step under an allocation tracker: the same code for the plan (meta) and for its check (real)."""

from __future__ import annotations

from typing import Any

import torch

from .tracker import AllocationTracker

CATEGORIES = ("weights", "adapters", "gradients", "optimizer states", "saved activations")


def build_model(config: Any, *, device: str, dtype: torch.dtype, rank: int, quant: str | None,
                attention: str | None = None, lora_alpha: int | None = None) -> torch.nn.Module:
    """A transformers causal LM from ``config`` on ``device`` (``"meta"`` or a real one) in ``dtype``, its decoder
    linears NF4 when ``quant == "nf4"``, wrapped by PEFT LoRA (rank ``rank``, every linear layer but the head,
    fp32 adapters: PEFT's defaults), in train mode.

    Example:
        >>> model = build_model(config, device="meta", dtype=torch.bfloat16, rank=16, quant="nf4")
    """
    import peft
    from transformers import AutoModelForCausalLM

    from .model import nf4_meta

    kwargs = {"attn_implementation": attention} if attention else {}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    if quant == "nf4":
        if device == "meta":
            nf4_meta(model, dtype)
        else:
            from ..testing import nf4_decoder

            nf4_decoder(model, dtype)
    elif quant is not None:
        raise ValueError(f"fastlora.plan: quant must be None or 'nf4', got {quant!r}")
    lora = peft.LoraConfig(r=rank, lora_alpha=lora_alpha or 2 * rank, lora_dropout=0.0, target_modules="all-linear")
    model = peft.get_peft_model(model, lora)
    model.train()
    return model


def count_model(tracker: AllocationTracker, model: torch.nn.Module) -> None:
    """Count what the model holds before the step: frozen weights (with 4-bit quant states and buffers) and the
    trainable adapters."""
    from .model import quant_state_tensors

    for p in model.parameters():
        tracker.tag(p, "adapters" if p.requires_grad else "weights")
    for b in model.buffers():
        tracker.tag(b, "weights")
    for t in quant_state_tensors(model):
        tracker.tag(t, "weights")


def make_optimizer(model: torch.nn.Module, name: str, *, foreach: bool | None) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters: ``"adamw"`` is torch's AdamW (fp32 states); ``foreach`` as on
    the device (torch uses it by default on CUDA: its temporaries span all parameters at once)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
    raise ValueError(f"fastlora.plan: optimizer {name!r} is not planned yet (only 'adamw')")


def training_step(model: torch.nn.Module, tracker: AllocationTracker, *, batch: int, seq_len: int, device: str,
                  optimizer: str = "adamw", foreach: bool | None = None) -> int:
    """Run forward with labels, backward and an optimizer step of ``model`` on ``[batch, seq_len]`` token ids,
    under ``tracker`` (which counts the model first), tagging what is saved for the backward, the gradients and
    the optimizer states. Returns the bytes of fastlora's per-thread workspaces the step left (NF4 dequant
    buffers, ``fastlora.ops._workspace``), which the step then releases.

    Example:
        >>> tracker = AllocationTracker("meta")
        >>> training_step(model, tracker, batch=1, seq_len=2048, device="meta")
        >>> tracker.peak.bytes
    """
    from ..ops._workspace import release_workspaces

    release_workspaces()  # a buffer left by an earlier step would hide this step's allocation
    count_model(tracker, model)
    opt = make_optimizer(model, optimizer, foreach=foreach)

    def pack(t: torch.Tensor) -> torch.Tensor:
        tracker.tag(t, "saved activations")
        return t

    with tracker:
        tracker.phase = "forward"
        ids = torch.zeros((batch, seq_len), dtype=torch.long, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        tracker.phase = "backward"
        loss.backward()
        del loss
        for p in model.parameters():
            if p.grad is not None:
                tracker.tag(p.grad, "gradients", overwrite=True)
        tracker.phase = "optimizer"
        opt.step()
        for state in opt.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    tracker.tag(t, "optimizer states", overwrite=True)
        tracker.peak_by_tag()  # the peak's storages are read now, while they are alive
    from ..ops import _workspace

    held = sum(tracker.rounding(b.untyped_storage().nbytes())
               for b in _workspace._local.__dict__.get("buffers", {}).values())
    release_workspaces()
    return held
