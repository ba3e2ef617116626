"""``FastLoRACallback``: a Trainer callback that patches the trainer's model with fastlora when the Trainer is made.

``on_init_end`` is the moment to patch: the Trainer has its model (a PeftModel, a 4-bit model) and no optimizer
yet, so class swaps cannot leave an optimizer holding stale state; checkpointing that the Trainer turns on later,
inside ``train()``, takes the offloaded kind when ``checkpointing="offload"`` was asked for.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .._logging import logger
from ..patching import PatchReport, patch


class FastLoRACallback(TrainerCallback):
    """Patch the Trainer's model with :func:`fastlora.patch` and the given options when the Trainer is made.

    TRL's ``SFTTrainer`` with ``loss_type="chunked_nll"`` (its default) computes the loss with its own forward,
    around the model's: the patched loss is then bypassed (the rest of the patch still runs), and a warning says
    so; ``loss_type="nll"`` keeps the model's loss.

    Attributes:
        report: the :class:`fastlora.PatchReport`, once the Trainer exists.

    Example:
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=data,
        ...                   callbacks=[FastLoRACallback(checkpointing="offload")])
        >>> print(trainer.callback_handler.callbacks[-1].report)
    """

    def __init__(self, **patch_options: Any) -> None:
        self.options = patch_options
        self.report: PatchReport | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("FastLoRACallback: the Trainer has no model to patch (model_init is not supported)")
        self.report = patch(model, **self.options)
        logger.info("FastLoRACallback: %s", self.report)
        if getattr(args, "loss_type", None) == "chunked_nll" and self.options.get("loss", "fused_linear"):
            logger.warning("FastLoRACallback: loss_type='chunked_nll' computes the loss outside the model, so "
                           "fastlora's loss is bypassed; use loss_type='nll' to keep it")
