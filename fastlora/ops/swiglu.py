"""SwiGLU, ``silu(gate) * up``: the gated activation of Llama-style MLPs.

The stack: reference -> registered ops (``fastlora::swiglu_fwd`` / ``fastlora::swiglu_bwd``, with fakes) that
run the backend the dispatcher picks -> autograd.Function -> :func:`swiglu`. The backend is resolved inside the op, at
run time, so a compiled graph follows ``use_backend`` and ``FASTLORA_BACKEND`` like eager code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import Backend
from ..kernels._utils import empty_like
from ..tuning import choose, close
from ._library import call, define

_OP = "swiglu"
_BACKENDS = frozenset(b.value for b in Backend)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """fp32 maths, one rounding to the input dtype: the oracle and the TORCH backend."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_backward_reference(grad: torch.Tensor, gate: torch.Tensor,
                              up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g, u, dy = gate.float(), up.float(), grad.float()
    s = torch.sigmoid(g)
    dgate = dy * u * s * (1 + g * (1 - s))
    dup = dy * g * s
    return dgate.to(gate.dtype), dup.to(up.dtype)


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    b = choose(_OP, gate.device, gate.dtype, backend, gate.numel(), lambda b: _fwd_on(b, gate, up),
               close(gate.dtype), part="fwd")
    return _fwd_on(b, gate, up)


def _fwd_on(b: Backend, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if b is Backend.TRITON:
        from ..kernels import swiglu as kernels

        return kernels.swiglu_fwd(gate, up)
    if b is Backend.CPP:
        out = empty_like(gate)
        torch.ops.fastlora.native_swiglu_fwd(gate, up, out)
        return out
    return swiglu_reference(gate, up)


def _swiglu_fwd_fake(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _swiglu_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    b = choose(_OP, gate.device, gate.dtype, backend, gate.numel(), lambda b: _bwd_on(b, grad, gate, up),
               close(gate.dtype), part="bwd")
    return _bwd_on(b, grad, gate, up)


def _bwd_on(b: Backend, grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if b is Backend.TRITON:
        from ..kernels import swiglu as kernels

        return kernels.swiglu_bwd(grad, gate, up)
    if b is Backend.CPP:
        dgate, dup = empty_like(gate), empty_like(up)
        torch.ops.fastlora.native_swiglu_bwd(grad, gate, up, dgate, dup)
        return dgate, dup
    return swiglu_backward_reference(grad, gate, up)


def _swiglu_bwd_fake(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.contiguous_format
    return torch.empty_like(gate, memory_format=fmt), torch.empty_like(up, memory_format=fmt)


define("swiglu_fwd(Tensor gate, Tensor up, str backend='auto') -> Tensor", _swiglu_fwd, _swiglu_fwd_fake)
define("swiglu_bwd(Tensor grad, Tensor gate, Tensor up, str backend='auto') -> (Tensor, Tensor)", _swiglu_bwd,
       _swiglu_bwd_fake)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.backend = backend
        return call("swiglu_fwd", gate, up, backend)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        dgate, dup = call("swiglu_bwd", grad.contiguous(), gate, up, ctx.backend)
        return dgate, dup, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Backend | str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32 and rounded once, with its backward.

    Args:
        gate: ``[..., I]`` float32, float16 or bfloat16.
        up: same shape, dtype and device as ``gate``.
        backend: ``"auto"`` (the dispatcher decides), or one of ``"triton"``, ``"cpp"``, ``"torch"``, which
            must then be able to run (else :class:`fastlora.BackendUnavailableError`).

    Returns:
        ``[..., I]`` in the dtype of ``gate``. Non-contiguous inputs are copied first.

    Example:
        >>> gate, up = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
        >>> y = fastlora.swiglu(gate, up)          # [2, 8, 64]
    """
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise TypeError(f"swiglu: gate and up must be tensors, got {type(gate).__name__} and {type(up).__name__}")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: up has shape {tuple(up.shape)}, expected gate's {tuple(gate.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"swiglu: up has dtype {up.dtype}, expected gate's {gate.dtype}")
    if gate.device != up.device:
        raise ValueError(f"swiglu: up is on {up.device}, expected gate's device {gate.device}")
    if gate.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"swiglu: gate has dtype {gate.dtype}, expected float32, float16 or bfloat16")
    name = backend.value if isinstance(backend, Backend) else str(backend).lower()
    if name not in _BACKENDS:
        raise ValueError(f"swiglu: unknown backend {backend!r} (expected one of {', '.join(sorted(_BACKENDS))})")
    gate, up = gate.contiguous(), up.contiguous()
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up, name)
    # No graph to record: skip autograd.Function, whose apply costs more than the op itself on small inputs.
    return call("swiglu_fwd", gate, up, name)
