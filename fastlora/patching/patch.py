"""``fastlora.patch(model)``: put a transformers or PEFT causal LM on fastlora's fused paths, per instance and
reversibly.

What is patched today: PEFT LoRA linear layers (over ``nn.Linear`` and bitsandbytes ``Linear4bit``) take
:func:`fastlora.lora_linear`; gated MLPs whose projections are plain LoRA layers take :func:`fastlora.lora_mlp`;
the loss (see :mod:`fastlora.patching.loss`), RoPE (see :mod:`fastlora.patching.rope`) and, when asked, gradient
checkpointing (see :mod:`fastlora.patching.checkpointing`). What is left alone is listed in the report with the
reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch

from .. import tuning
from .._logging import logger
from ..checkpointing import OffloadedCheckpointing
from ..dispatch import Backend, BackendUnavailableError, resolve_backend
from .checkpointing import patch_checkpointing
from .coverage import CoverageReport
from .families import Family, family_of
from .lora_layers import fast_class, lora_layer_classes
from .loss import CountedLoss, fused_class
from .mlp import ACTIVATIONS, fast_mlp_class, projections
from .peft_lora import NothingToFuse, UnsupportedLoRA, _is_bnb_4bit, lora_args
from .qkv import fast_qkv_class, qkv_arguments
from .report import PatchReport
from .rope import fast_attention_class, install_trampoline, rope_worth_it

_ATTR = "_fastlora_patch"
_LOSSES = ("fused_linear", "logits", None)
_CHECKPOINTING = ("offload", None)


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def patch(model: torch.nn.Module, *, rope: bool = True, lora: bool = True, mlp: bool = True,
          loss: str | None = "fused_linear", checkpointing: str | OffloadedCheckpointing | None = None,
          backend: Backend | str = "auto") -> PatchReport:
    """Patch a transformers causal LM, a PeftModel around one, or a 4-bit one, in place; returns the report.

    Patching twice with the same options changes nothing and returns the first report; ``report.undo()`` or
    :func:`fastlora.unpatch` restores the exact original behaviour. Other models in the process are untouched.

    Args:
        model: a ``*ForCausalLM`` of a supported family (see :data:`fastlora.patching.families.FAMILIES`), or a
            ``PeftModel`` wrapping one.
        lora: put PEFT's LoRA linear layers on :func:`fastlora.lora_linear` (layers it cannot serve, such as DoRA,
            keep PEFT's forward and are listed with the reason), and an attention's q, k and v projections, when
            all three are plain LoRA layers, on one :func:`fastlora.lora_qkv`.
        loss: ``"fused_linear"`` (training with labels never makes the logits, unless all of them fit in one chunk
            of the fused loss and measure faster; the output's ``logits`` is then None), ``"logits"`` (fastlora's
            cross-entropy on the logits) or None (transformers' loss).
        rope: rotate q and k with :func:`fastlora.apply_rope`. Unless a backend is forced, each shape's first call
            measures it against transformers' function and the faster one runs (fastlora.tuning); with
            ``FASTLORA_TUNE=0`` RoPE is left alone on a CPU (only the reference would run there, slower).
        mlp: run LoRA MLPs as one :func:`fastlora.lora_mlp`, measured against the layers one by one in the same way
            (``FASTLORA_TUNE=0``: left alone on a CPU, where it measured slower once).
        checkpointing: ``"offload"`` (or an :class:`fastlora.OffloadedCheckpointing` with your settings): gradient
            checkpointing, when it is on or whenever it is turned on later (by ``activation_checkpointing_enable``
            or a Trainer), keeps each layer's input in CPU memory until the backward; None leaves it alone.
        backend: force one backend for the patched ops (``"auto"``: the dispatcher decides).

    Raises:
        ValueError: an unsupported model type (nothing is changed), a bad option, or a model already patched with
            other options (unpatch it first).

    Example:
        >>> model = get_peft_model(LlamaForCausalLM(config), LoraConfig(target_modules="all-linear"))
        >>> report = fastlora.patch(model)
        >>> print(report)
        >>> fastlora.unpatch(model)
    """
    hf = _hf_model(model)
    family = family_of(hf)  # raises before anything changes
    if loss not in _LOSSES:
        raise ValueError(f"fastlora.patch: loss must be one of {_LOSSES}, got {loss!r}")
    if not (checkpointing in _CHECKPOINTING or isinstance(checkpointing, OffloadedCheckpointing)):
        raise ValueError(f"fastlora.patch: checkpointing must be one of {_CHECKPOINTING} or an "
                         f"OffloadedCheckpointing, got {checkpointing!r}")
    forced = None if Backend.parse(backend, what="fastlora.patch") is Backend.AUTO else backend
    if forced is not None:
        _check_forced(hf, forced, lora=lora, rope=rope, mlp=mlp)
    options = dict(rope=rope, lora=lora, mlp=mlp, loss=loss, checkpointing=checkpointing, backend=backend)
    existing = getattr(hf, _ATTR, None)
    if existing is not None and not existing.undone:
        if existing.options != options:
            changed = sorted(k for k in options if existing.options.get(k) != options[k])
            raise ValueError(f"fastlora.patch: this model is already patched with other options ({', '.join(changed)}"
                             "); call fastlora.unpatch(model) first")
        return existing
    offload = OffloadedCheckpointing() if checkpointing == "offload" else checkpointing
    if offload is not None:
        offload.bind(hf)  # an object that belongs to another model is refused before anything changes
    report = PatchReport(family.model_type, options=options)
    if lora:
        _patch_lora_layers(hf, report, forced)
        _patch_qkv(hf, family, report, forced)
    if loss is not None:
        _patch_loss(hf, family, loss, report)
    if rope:
        _patch_rope(hf, family, report, forced)
    if mlp:
        _patch_mlp(hf, family, report, forced)
    if offload is not None:
        patch_checkpointing(hf, offload, report)
    tuner = getattr(model, "base_model", None) if hf is not model else None
    for name in ("merge_and_unload", "unload"):
        if callable(getattr(type(tuner), name, None)):
            report.set_attr(None, "", tuner, name, functools.partial(_unpatched_then, tuner, name))
    report.set_attr(None, "", hf, _ATTR, report)
    return report


def _check_forced(hf: torch.nn.Module, backend: Backend | str, *, lora: bool, rope: bool, mlp: bool) -> None:
    """Refuse, before anything changes, a forced backend that cannot run an op the patch routes through it on the
    model's device and dtype (it would fail deep inside the first forward)."""
    param = next(hf.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    four_bit = any(_is_bnb_4bit(type(m)) for m in hf.modules())
    ops = [op for op, used in (("rope", rope), ("glu", mlp), ("nf4_dequantize", lora and four_bit)) if used]
    for op in ops:
        try:
            resolve_backend(op, device, dtype, backend)
        except (BackendUnavailableError, TypeError) as e:
            raise BackendUnavailableError(f"fastlora.patch: backend={str(backend)!r} cannot run {op} on this model's "
                                          f"{device.type} ({e}); nothing was changed") from None


def _unpatched_then(tuner: torch.nn.Module, name: str, *args: object, **kwargs: object) -> torch.nn.Module:
    """PEFT's ``merge_and_unload()`` or ``unload()`` of a patched model: the patch is undone first, so the model
    returned is transformers' own (not a patched one whose LoRA layers are gone and whose training forward still
    returns no logits)."""
    if unpatch(tuner.model):
        logger.info("fastlora: %s() of a patched model: unpatched it first; patch the returned model again to "
                    "train it with fastlora", name)
    return getattr(type(tuner), name)(tuner, *args, **kwargs)


def unpatch(model: torch.nn.Module) -> bool:
    """Undo :func:`patch` on this model; returns whether there was anything to undo.

    Example:
        >>> fastlora.unpatch(model)
        True
    """
    report = getattr(_hf_model(model), _ATTR, None)
    if report is None or report.undone:
        return False
    report.undo()
    return True


def coverage(model: torch.nn.Module) -> CoverageReport:
    """What ran since ``model`` was patched: per patched module, calls on fastlora's ops and fallbacks with why.

    Raises:
        ValueError: the model was never patched.

    Example:
        >>> fastlora.patch(model); trainer.train()
        >>> print(fastlora.patching.coverage(model))
    """
    report = getattr(_hf_model(model), _ATTR, None)
    if report is None:
        raise ValueError("fastlora.patching.coverage: this model was not patched by fastlora.patch")
    return report.coverage()


def _patch_lora_layers(hf: torch.nn.Module, report: PatchReport, backend: Backend | str | None) -> None:
    try:
        classes = lora_layer_classes()
    except ImportError:
        report.skip("lora", "peft is not installed")
        return
    from peft.tuners.lora import LoraLayer

    for name, module in hf.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        cls = type(module)
        if cls not in classes:
            report.skip(name, f"{cls.__name__}: not a plain LoRA linear layer")
            continue
        _swap_if_supported(report, name, "", lambda m=module: lora_args(m), f"{cls.__name__} -> fastlora.lora_linear",
                           module, fast_class(cls), backend, "lora_linear")


def _swap_if_supported(report: PatchReport, name: str, part: str, check: Callable[[], object], what: str,
                       module: torch.nn.Module, new_class: type, backend: Backend | str | None, op: str,
                       counter_attr: str = "_fastlora_coverage", **attrs: object) -> bool:
    """Swap ``module``'s class if ``check()`` passes (no active adapter right now is fine: one may be later);
    else record the UnsupportedLoRA reason (``part: reason``). The module gets a call counter for ``op``."""
    try:
        check()
    except NothingToFuse:
        pass
    except UnsupportedLoRA as e:
        report.skip(name, f"{part}: {e}" if part else str(e))
        return False
    report.swap_class(name, what, module, new_class, _fastlora_backend=backend,
                      **{counter_attr: report.track(name, op)}, **attrs)
    return True


def _modules(hf: torch.nn.Module, family: Family, suffix: str) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """(name, module, transformers class name) of the family's modules whose transformers class name ends with
    ``suffix`` (``Attention``, ``MLP``), also when an earlier patch already swapped their class for a subclass."""
    for name, module in hf.named_modules():
        cls = next((c for c in type(module).__mro__ if c.__module__ == family.modeling), None)
        if cls is not None and cls.__name__.endswith(suffix):
            yield name, module, cls.__name__


def _patch_qkv(hf: torch.nn.Module, family: Family, report: PatchReport, backend: Backend | str | None) -> None:
    for name, module, cls_name in _modules(hf, family, "Attention"):
        if not any(hasattr(getattr(module, proj, None), "lora_A") for proj in family.qkv):
            continue  # no LoRA on the attention: nothing to fuse, nothing to report
        if _swap_if_supported(report, name, "q/k/v", lambda m=module: qkv_arguments(m, family),
                              f"{cls_name}: {'/'.join(family.qkv)} -> fastlora.lora_qkv", module,
                              fast_qkv_class(type(module), family), backend, "lora_qkv", "_fastlora_qkv_coverage"):
            for proj in family.qkv:
                getattr(module, proj)._fastlora_coverage.served_by = module._fastlora_qkv_coverage


def _patch_loss(hf: torch.nn.Module, family: Family, loss: str, report: PatchReport) -> None:
    if not isinstance(getattr(hf, "lm_head", None), torch.nn.Module):
        report.skip("loss", f"{type(hf).__name__} has no lm_head: not a causal LM")
        return
    # transformers 5 keeps an instance's loss in _loss_function (the loss_function property's setter).
    counter = report.track("loss", "loss")
    report.set_attr("loss_function", "transformers' ForCausalLMLoss -> fastlora.cross_entropy", hf,
                    "_loss_function", CountedLoss(counter))
    if loss == "fused_linear":
        if type(hf.lm_head) is not torch.nn.Linear:
            report.skip("lm_head", f"{type(hf.lm_head).__name__}: the fused loss needs a plain nn.Linear head; "
                                   "the logits loss runs")
            return
        cls = type(hf)
        report.swap_class(cls.__name__, "training with labels: fused_linear_cross_entropy, no logits", hf,
                          fused_class(cls, family), _fastlora_loss_coverage=counter)


def _patch_rope(hf: torch.nn.Module, family: Family, report: PatchReport, backend: Backend | str | None) -> None:
    param = next(hf.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    why_not = rope_worth_it(device, dtype if dtype.is_floating_point else torch.float32, backend)
    if why_not:
        report.skip("rope", why_not)
        return
    install_trampoline(family.modeling)
    measured = " (or transformers' own where it measures faster)" if backend is None and tuning.enabled() else ""
    for name, module, cls_name in _modules(hf, family, "Attention"):
        report.swap_class(name, f"{cls_name}: apply_rotary_pos_emb -> fastlora.apply_rope{measured}", module,
                          fast_attention_class(type(module)), _fastlora_rope_backend=backend,
                          _fastlora_rope_coverage=report.track(name, "apply_rope"))


def _patch_mlp(hf: torch.nn.Module, family: Family, report: PatchReport, backend: Backend | str | None) -> None:
    param = next(hf.parameters(), None)
    if backend is None and (param is None or param.device.type == "cpu") and not tuning.enabled():
        # Measured once (lora_mlp suite, 2-core CPU, fp32): 0.86-0.93x PEFT's separate layers for a full step.
        # With tuning on, each MLP measures both ways on its own shapes instead.
        report.skip("mlp", "on a CPU the fused MLP measured slower than the layers one by one (FASTLORA_TUNE=0: "
                           "not measured here)")
        return
    act_name = getattr(hf.config, "hidden_activation", None) or getattr(hf.config, "hidden_act", None)
    activation = ACTIVATIONS.get(act_name)
    if activation is None:
        report.skip("mlp", f"activation {act_name!r} has no fused kernel")
        return
    measured = " (or the layers one by one where they measure faster)" if backend is None and tuning.enabled() \
        else ""
    for name, module, cls_name in _modules(hf, family, "MLP"):
        if _swap_if_supported(report, name, "MLP", lambda m=module: projections(m, family),
                              f"{cls_name} -> fastlora.lora_mlp ({activation}){measured}", module,
                              fast_mlp_class(type(module), family, activation), backend, "lora_mlp"):
            for proj in (*family.gate_up, family.down):
                counter = getattr(getattr(module, proj), "_fastlora_coverage", None)
                if counter is not None:
                    counter.served_by = module._fastlora_coverage
