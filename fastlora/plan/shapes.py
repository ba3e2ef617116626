"""Model shapes shipped as data (no download), and how a plan's ``config`` argument becomes a transformers config."""

from __future__ import annotations

import json
import os
from typing import Any

_LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
               vocab_size=128256, rope_theta=500000.0, bos_token_id=128000, tie_word_embeddings=False,
               attention_bias=False, mlp_bias=False, head_dim=128, num_key_value_heads=8)
_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)

#: config.json values of well-known models (copied from their Hugging Face configs; only what shapes memory).
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, max_position_embeddings=8192, eos_token_id=128001),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=131072, rope_scaling=_LLAMA31_ROPE,
                         eos_token_id=[128001, 128008, 128009]),
    "llama-3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, max_position_embeddings=8192, eos_token_id=128001),
    "llama-3.1-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, max_position_embeddings=131072, rope_scaling=_LLAMA31_ROPE,
                          eos_token_id=[128001, 128008, 128009]),
}


def load_config(config: Any) -> Any:
    """A transformers ``PretrainedConfig`` from one, from a name in :data:`KNOWN_CONFIGS` (case insensitive, an
    ``org/`` prefix and ``meta-llama-`` spelling allowed), or from a local ``config.json`` (or a directory holding
    one).

    Raises:
        ValueError: neither a known name nor an existing path.

    Example:
        >>> load_config("meta-llama/Llama-3.1-8B").num_hidden_layers
        32
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"fastlora.plan: config must be a transformers config, a name or a path, got "
                        f"{type(config).__name__}")
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            values = json.load(f)
    else:
        key = path.lower().rsplit("/", 1)[-1].removeprefix("meta-")
        key = key.removesuffix("-instruct").replace("llama3", "llama-3").replace("_", "-")
        if key not in KNOWN_CONFIGS:
            raise ValueError(f"fastlora.plan: {config!r} is neither a known model ({', '.join(KNOWN_CONFIGS)}) "
                             "nor a config.json path")
        values = dict(KNOWN_CONFIGS[key])
    values = dict(values)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)
