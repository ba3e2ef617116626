"""``fastlora.patch(model, checkpointing="offload")``: the model's gradient checkpointing offloads to CPU memory,
whoever turns it on.

Checkpointing is often switched on after the patch (a Trainer does it inside ``train()``), through transformers'
``_set_gradient_checkpointing(enable, gradient_checkpointing_func)``. The patch swaps the model's class for a
subclass whose ``_set_gradient_checkpointing`` hands the layers the model's :class:`OffloadedCheckpointing`
instead, after giving it the function transformers chose (so ``use_reentrant`` and the other checkpoint
arguments still hold). Checkpointing that is already on is switched over at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpointing import OffloadedCheckpointing
from .report import PatchReport

_ATTR = "_fastlora_checkpointing"
_CLASSES: dict[type, type] = {}


def offload_class(cls: type) -> type:
    """The subclass of a transformers model class whose checkpointing goes through ``self._fastlora_checkpointing``."""
    if cls not in _CLASSES:
        def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None, **kwargs):  # noqa: ANN001
            offload = self.__dict__.get(_ATTR)
            if enable and offload is not None and gradient_checkpointing_func is not None \
                    and gradient_checkpointing_func is not offload:
                offload.checkpoint_fn = gradient_checkpointing_func
                gradient_checkpointing_func = offload
            if gradient_checkpointing_func is not None:
                kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
            return cls._set_gradient_checkpointing(self, enable=enable, **kwargs)

        # The original name: save_pretrained writes the class name into config.architectures.
        _CLASSES[cls] = type(cls.__name__, (cls,), {
            "_set_gradient_checkpointing": _set_gradient_checkpointing, "_fastlora_original": cls,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _CLASSES[cls]


@dataclass
class RestoreCheckpointFunction:
    """Undo of the switch: every module whose checkpoint function is ``offload`` gets back the function
    ``offload`` was running (torch's checkpoint, or the one transformers was last given)."""

    model: torch.nn.Module
    offload: OffloadedCheckpointing

    def undo(self) -> None:
        for module in self.model.modules():
            if module.__dict__.get("_gradient_checkpointing_func") is self.offload:
                module._gradient_checkpointing_func = self.offload.checkpoint_fn


def patch_checkpointing(hf: torch.nn.Module, offload: OffloadedCheckpointing, report: PatchReport) -> None:
    """Make ``hf``'s gradient checkpointing (now or once turned on) offload through ``offload``."""
    if not getattr(hf, "supports_gradient_checkpointing", False) or \
            not callable(getattr(hf, "_set_gradient_checkpointing", None)):
        report.skip("checkpointing", f"{type(hf).__name__} does not support gradient checkpointing")
        return
    offload.bind(hf)
    report.swap_class("checkpointing", "layer inputs offloaded to CPU memory (fastlora.OffloadedCheckpointing)",
                      hf, offload_class(type(hf)), **{_ATTR: offload})
    report.add_change(RestoreCheckpointFunction(hf, offload))
    current = next((m.__dict__["_gradient_checkpointing_func"] for m in hf.modules()
                    if getattr(m, "gradient_checkpointing", False) and "_gradient_checkpointing_func" in m.__dict__),
                   None)
    if current is not None:
        # Already on: switch the layers over now, keeping which layers checkpoint (every_n_layers).
        on = {m: m.gradient_checkpointing for m in hf.modules() if hasattr(m, "gradient_checkpointing")}
        hf._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=current)
        for module, flag in on.items():
            module.gradient_checkpointing = flag
