"""The loss patches of a causal LM, per instance.

``loss="logits"``: the model's ``loss_function`` (an instance-level property in transformers 5) becomes
fastlora's cross-entropy: the same value as transformers' ``ForCausalLMLoss`` (labels shifted, ignored labels,
``num_items_in_batch``), without upcasting the whole logits tensor to fp32.

``loss="fused_linear"``: the instance's class is swapped for a subclass whose forward, when the model trains
with labels, runs the decoder and then :func:`fastlora.fused_linear_cross_entropy` on its last hidden state: the
``[B, S, V]`` logits are never made (unless all of them take less memory than one chunk of the fused loss: then
the logits and torch's cross-entropy are measured against it, and the faster runs), and the output's ``logits``
field is None. Everything else (no labels, eval
mode, ``logits_to_keep``, ``return_dict=False``) goes to transformers' own forward, which then uses the
``"logits"`` loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.cross_entropy import cross_entropy
from ..ops.linear_cross_entropy import DEFAULT_CHUNK_BYTES, fused_linear_cross_entropy
from ..tuning import measured_variant
from .coverage import Coverage
from .families import Family


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels of the next token (``[..., S]``, the last position ignored), as transformers shifts them."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                   num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                   shift_labels: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on fastlora's cross-entropy (fp32 accumulation, no fp32 copy of the
    logits): the ``loss_function`` that ``fastlora.patch`` installs.

    Example:
        >>> model.loss_function = causal_lm_loss
    """
    targets = shift_labels if shift_labels is not None else _shift(labels, ignore_index)
    return cross_entropy(logits, targets.to(logits.device), ignore_index=ignore_index,
                         num_items_in_batch=num_items_in_batch)


_shift = shift_labels
_FUSED: dict[type, type] = {}


@dataclass
class CountedLoss:
    """:func:`causal_lm_loss` as a model's ``loss_function``, counting its calls in the patch's coverage (data, not
    a closure: a deep copy of the model counts in its own report)."""

    coverage: Coverage

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: object) -> torch.Tensor:
        self.coverage.hit("cross_entropy")
        return causal_lm_loss(logits, labels, vocab_size, **kwargs)


def fused_class(cls: type, family: Family) -> type:
    """The subclass of a ``*ForCausalLM`` class whose training forward with labels never makes the logits."""
    key = (cls, family)
    if key not in _FUSED:
        # The original name: save_pretrained writes the class name into config.architectures.
        _FUSED[key] = type(cls.__name__, (cls,), {
            "forward": _fused_forward(cls.forward, family), "_fastlora_original": cls, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _FUSED[key]


def _fused_forward(original: Callable[..., object], family: Family) -> Callable[..., object]:
    # The original's parameter names, to take positional arguments as it would: transformers renames some between
    # releases (past_key_values became cache in 5.2x), so the patched forward names none of them itself.
    names = [p.name for p in inspect.signature(original).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]

    def forward(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.forward takes at most {len(names)} positional arguments, "
                            f"got {len(args)}")
        kwargs.update(zip(names, args, strict=False))  # fewer args than names: checked above
        labels = kwargs.get("labels")
        # Not isinstance(self, <this class>) any more: unpatched, but called through a bound method kept from
        # before (TRL's fused head stores the model's forward when the trainer is made).
        plain = labels is None or not self.training or not torch.is_grad_enabled() \
            or kwargs.get("logits_to_keep", 0) != 0 or kwargs.get("return_dict") is False \
            or type(self.lm_head) is not torch.nn.Linear or "_fastlora_loss_coverage" not in self.__dict__
        if plain:
            return original(self, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        targets = kwargs.pop("shift_labels", None)
        outputs = getattr(self, self.base_model_prefix)(**kwargs)
        targets = _shift(labels) if targets is None else targets
        softcap = getattr(self.config, family.final_logit_softcap, None) if family.final_logit_softcap else None
        # In the head's dtype, as F.linear would need it (an fp32 head after prepare_model_for_kbit_training).
        hidden = outputs.last_hidden_state.to(self.lm_head.weight.dtype)
        head, targets = self.lm_head, targets.to(hidden.device)
        n_items = kwargs.get("num_items_in_batch")
        coverage = self._fastlora_loss_coverage
        if _variant(hidden, head, targets, softcap, n_items) == LOGITS:
            coverage.chose_original("the logits and torch's cross-entropy measured faster here (fastlora.tuning)")
            loss = logits_loss(hidden, head.weight, head.bias, targets, softcap, n_items)
        else:
            coverage.hit("fused_linear_cross_entropy")
            loss = fused_linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, softcap=softcap,
                                              num_items_in_batch=n_items)
        # The decoder's other outputs under their names in this transformers release (the cache, hidden states).
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=None, **rest)

    # The Trainer keeps only the dataset columns the forward's signature names (and generate checks its kwargs).
    forward.__signature__ = inspect.signature(original)
    return forward


#: The fused forward's two ways to the loss: fused_linear_cross_entropy (never the logits), or the logits and torch's
#: cross-entropy, as transformers computes it (offered only where all the logits take no more memory than one
#: chunk of the fused loss).
FUSED_LINEAR, LOGITS = "fused_linear", "logits"


def logits_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                softcap: float | None, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
    """transformers' causal-LM loss on ``hidden @ weight.T (+ bias)``: the logits upcast to fp32, ignored labels
    -100, summed over ``num_items_in_batch`` when given, else the mean over the counted tokens."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    flat, flat_targets = logits.view(-1, logits.shape[-1]), targets.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(flat, flat_targets, ignore_index=-100)
    return F.cross_entropy(flat, flat_targets, ignore_index=-100, reduction="sum") / num_items_in_batch


def _variant(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, softcap: float | None,
             num_items_in_batch: torch.Tensor | int | None) -> str:
    """Fused or on the logits for this step: measured once per shape (forward and backward) where tuning is on and
    the logits are small enough (bf16 logits, their fp32 copy and its gradient within one fused chunk's budget)."""
    rows, vocab = hidden.numel() // hidden.shape[-1], head.weight.shape[0]
    small = rows * vocab * (hidden.element_size() + 8) <= DEFAULT_CHUNK_BYTES
    params = [t for t in (head.weight, head.bias) if t is not None and t.requires_grad]

    def run(variant: str, grad: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            if variant == LOGITS:
                loss = logits_loss(h, head.weight, head.bias, targets, softcap, num_items_in_batch)
            else:
                loss = fused_linear_cross_entropy(h, head.weight, targets, bias=head.bias, softcap=softcap,
                                                  num_items_in_batch=num_items_in_batch)
            return (loss.detach(), *torch.autograd.grad(loss, [h, *params], grad(loss)))

    shape = (vocab, hidden.shape[-1], head.weight.dtype, head.bias is not None, softcap)
    return measured_variant("fused_linear_cross_entropy", hidden.reshape(-1, hidden.shape[-1]), shape,
                            lambda: [FUSED_LINEAR, LOGITS] if small else [FUSED_LINEAR], run, True)
