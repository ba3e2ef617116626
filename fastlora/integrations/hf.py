"""``FastLoRACallback``: a Trainer callback that patches the trainer's model with fastlora when the Trainer is made,
and says after the first optimizer step what really ran.

``on_init_end`` is the moment to patch: the Trainer has its model (a PeftModel, a 4-bit model) and no optimizer
yet, so class swaps cannot leave an optimizer holding stale state; checkpointing that the Trainer turns on later,
inside ``train()``, takes the offloaded kind when ``checkpointing="offload"`` was asked for.

A trainer can route around a patched model: TRL's ``SFTTrainer`` (1.16) sets the model's ``forward`` on the
instance to its own fused lm_head after the callback has patched it, so fastlora's loss never runs there (its LoRA,
q/k/v and RoPE patches still do, inside TRL's forward). That head is not replaced: it is a chunked Triton kernel
that never makes the full logits either, and it returns what TRL's losses and metrics need (per-token log-probs,
entropy, top-1 hits) with options fastlora's loss does not have (temperature, logit scales, MoE auxiliary loss). So
``on_train_begin`` finds such a forward and warns with the reason; after the first optimizer step the patch's
coverage is logged, and every patched part that has not run fastlora's ops yet is named in one warning.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .._logging import logger
from ..patching import PatchReport, patch
from ..patching.patch import _hf_model


def shadowing_forward(hf: Any) -> str | None:
    """Who set ``forward`` on this model instance (which hides its class's, and so fastlora's loss), or None.

    Example:
        >>> shadowing_forward(trainer.model.get_base_model())
        "TRL's fused lm_head (_fused_forward in .../trl/trainer/utils.py)"
    """
    forward = getattr(hf, "__dict__", {}).get("forward")
    if forward is None:
        return None
    func = getattr(forward, "__func__", forward)
    # The code object, not __module__ or __qualname__: TRL's wrapper copies those from the forward it wraps.
    code = getattr(func, "__code__", None)
    where = f"{code.co_name} in {code.co_filename}" if code is not None else repr(func)
    if code is not None and "fused_lm_head" in code.co_varnames and "/trl/" in code.co_filename.replace("\\", "/"):
        return f"TRL's fused lm_head ({where})"
    return f"a forward set on the model instance ({where})"


class FastLoRACallback(TrainerCallback):
    """Patch the Trainer's model with :func:`fastlora.patch` and the given options when the Trainer is made; after
    the first optimizer step, log what ran (:meth:`fastlora.PatchReport.coverage`) and warn about what did not.

    TRL's ``SFTTrainer`` computes its loss with its own fused lm_head (every ``loss_type`` of TRL 1.16): fastlora's
    loss is then bypassed, the rest of the patch still runs, and a warning says so (``loss=None`` asks for no loss
    patch, and so no warning).

    Attributes:
        report: the :class:`fastlora.PatchReport`, once the Trainer exists.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=data,
        ...                   callbacks=[FastLoRACallback(checkpointing="offload")])
        >>> trainer.train()
        >>> print(trainer.callback_handler.callbacks[-1].report.coverage())
    """

    def __init__(self, **patch_options: Any) -> None:
        self.options = patch_options
        self.report: PatchReport | None = None
        self._hf: Any = None
        self._explained: set[str] = set()  # ops whose absence a warning has already explained

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("FastLoRACallback: the Trainer has no model to patch (model_init is not supported)")
        self.report = patch(model, **self.options)
        self._hf = _hf_model(model)
        logger.info("FastLoRACallback: %s", self.report)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.report is None or self.report.undone or "loss" in self._explained:
            return
        who = shadowing_forward(self._hf)
        if who is not None and any(c.op == "loss" for c in self.report.counters):
            self._explained.add("loss")
            trl = " (TRL's head is itself a chunked kernel that never makes the full logits)" \
                if who.startswith("TRL") else ""
            logger.warning("FastLoRACallback: %s replaces the model's forward, so fastlora's loss does not run in "
                           "this training; fastlora's other patches do, inside that forward%s. "
                           "FastLoRACallback(loss=None) leaves the loss to the trainer without this warning", who, trl)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != 1 or self.report is None or self.report.undone:
            return
        coverage = self.report.coverage()
        logger.info("FastLoRACallback: after the first optimizer step, %s", coverage)
        missing = [c for c in coverage.never_ran() if c.op not in self._explained]
        if missing:
            why = sorted({reason for c in missing for reason in c.fell_back} or {"they were never called"})
            logger.warning("FastLoRACallback: %d patched modules did not run fastlora's ops in the first optimizer "
                           "step (%s; first: %s): %s", len(missing), ", ".join(sorted({c.op for c in missing})),
                           missing[0].name, "; ".join(why))
