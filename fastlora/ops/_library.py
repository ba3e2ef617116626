"""The ``fastlora`` torch.library namespace that the Python ops are defined in."""

from __future__ import annotations

from collections.abc import Callable

import torch

# FRAGMENT: the native extension defines its own ops (native_*) in the same namespace.
_LIB = torch.library.Library("fastlora", "FRAGMENT")


def define(schema: str, impl: Callable[..., object], fake: Callable[..., object]) -> None:
    """Define ``fastlora::<name>`` from its schema, with one implementation for every device and a fake one.

    The low-level define/impl pair costs about 15 us a call where torch.library.custom_op costs 40: these ops
    run once per layer per step. The backend is chosen inside ``impl``, so one registration serves them all.

    Example:
        >>> define("swiglu_fwd(Tensor gate, Tensor up, str backend='auto') -> Tensor", impl, fake)
    """
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastlora::{name}", fake, lib=_LIB)
