"""The ops: references, torch.library registrations, autograd Functions and the functional API."""

from .swiglu import swiglu, swiglu_reference

__all__ = ["swiglu", "swiglu_reference"]
