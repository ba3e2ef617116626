"""The model families fastlora patches, as data: where each keeps the pieces the patches replace.

A family is found by ``config.model_type``. Adding one is adding a row, not copying a forward.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Where a transformers family keeps what fastlora patches.

    ``modeling``: the module whose global ``apply_rotary_pos_emb`` its attention calls. ``qkv``, ``gate_up`` and
    ``down``: the projection names in its attention and MLP (Phi3 fuses ``qkv_proj`` and ``gate_up_proj``, gate
    first). ``activation``: the MLP's gate activation (``silu``, or ``gelu_tanh`` for Gemma's
    ``gelu_pytorch_tanh``). ``final_logit_softcap``: the config attribute of a final logit soft-cap (Gemma2/3).
    """

    model_type: str
    modeling: str
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")
    down: str = "down_proj"
    activation: str = "silu"
    final_logit_softcap: str | None = None


def _family(model_type: str, module: str, **kw: object) -> Family:
    return Family(model_type, f"transformers.models.{module}.modeling_{module}", **kw)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _family("llama", "llama"),
    _family("mistral", "mistral"),
    _family("qwen2", "qwen2"),
    _family("qwen3", "qwen3"),
    _family("gemma", "gemma", activation="gelu_tanh"),
    _family("gemma2", "gemma2", activation="gelu_tanh", final_logit_softcap="final_logit_softcapping"),
    _family("gemma3_text", "gemma3", activation="gelu_tanh", final_logit_softcap="final_logit_softcapping"),
    _family("phi3", "phi3", qkv=("qkv_proj",), gate_up=("gate_up_proj",)),
)}


def family_of(model: object) -> Family:
    """The family of a transformers model (by ``config.model_type``).

    Raises:
        ValueError: an unsupported model type, with the list of the supported ones.

    Example:
        >>> family_of(LlamaForCausalLM(LlamaConfig())).model_type
        'llama'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"fastlora.patch: model type {model_type!r} is not supported (supported: "
                         f"{', '.join(sorted(FAMILIES))}); nothing was changed")
    return FAMILIES[model_type]
