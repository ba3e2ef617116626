"""Hooks for higher-level trainers: HF Trainer (and TRL's trainers, which are HF Trainers)."""

from .hf import FastLoRACallback

__all__ = ["FastLoRACallback"]
