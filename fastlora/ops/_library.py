"""The ``fastlora`` torch.library namespace that the Python ops are defined in."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._autocast import autocast_off

# FRAGMENT: the native extension defines its own ops (native_*) in the same namespace.
_LIB = torch.library.Library("fastlora", "FRAGMENT")
_IMPLS: dict[str, Callable[..., object]] = {}


def define(schema: str, impl: Callable[..., object], fake: Callable[..., object]) -> None:
    """Define ``fastlora::<name>`` from its schema, with one implementation for every device and a fake one.
    The implementation runs with autocast off.

    The low-level define/impl pair costs about 15 us a call where torch.library.custom_op costs 40: these ops
    run once per layer per step. The backend is chosen inside ``impl``, so one registration serves them all.

    Example:
        >>> define("swiglu_fwd(Tensor gate, Tensor up, str backend='auto') -> Tensor", impl, fake)
    """
    name = schema.split("(", 1)[0]
    # Autocast off inside: the implementation chose its GEMMs' dtypes (see _autocast.py).
    impl = autocast_off(impl)
    _IMPLS[name] = impl
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastlora::{name}", fake, lib=_LIB)


def call(name: str, *args: object) -> object:
    """Run ``fastlora::<name>``: straight into its implementation in plain eager mode, through ``torch.ops``
    otherwise.

    The dispatcher's boxing of a Python-defined op with tensor lists costs 20-35 us a call on a CPU, as much as
    a small GEMM; a LoRA layer makes two such calls per step. Under torch.compile, or any dispatch mode (fake
    tensors, tracing), the registered op runs, so graphs and opcheck see exactly the op.

    Example:
        >>> y, xa = call("lora_linear_fwd", x, w, None, [x], [a], [b], [2.0], [None])
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return getattr(torch.ops.fastlora, name)(*args)
    return _IMPLS[name](*args)
