"""Gated activations on a gate_up tensor: ``act(gate) * up`` for ``[M, 2I]`` = ``[gate | up]``.

The stack: reference -> ``fastlora::glu_fwd`` and ``fastlora::glu_bwd_`` (the backward writes the gate and up
gradients over the input, declared as a mutation) -> used by :func:`fastlora.lora_mlp`, which recomputes the
activation in its backward instead of storing it. Activations: ``silu`` (SwiGLU), ``gelu_tanh`` and ``gelu``
(GeGLU, as ``gelu_pytorch_tanh`` and ``gelu`` in transformers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import Backend, resolve_backend
from ..kernels._utils import empty
from ._library import define

_OP = "glu"
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def activation_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none")


def glu_reference(gu: torch.Tensor, activation: str) -> torch.Tensor:
    """fp32 maths, one rounding to the input dtype: the oracle and the TORCH backend (differentiable)."""
    g, u = gu.float().chunk(2, dim=-1)
    return (activation_reference(g, activation) * u).to(gu.dtype)


def activation_derivative(g: torch.Tensor, activation: str) -> torch.Tensor:
    """``act'(g)`` in closed form (the kernel's formulas)."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if activation == "gelu_tanh":
        t = torch.tanh(0.7978845608028654 * (g + 0.044715 * g**3))
        return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * g * g)
    return 0.5 * (1 + torch.erf(g * 0.7071067811865476)) + g * 0.3989422804014327 * torch.exp(-0.5 * g * g)


def glu_backward_reference(dh: torch.Tensor, gu: torch.Tensor, activation: str) -> torch.Tensor:
    """``[dh * up * act'(gate) | dh * act(gate)]`` in fp32, rounded once to ``gu``'s dtype."""
    g, u = gu.float().chunk(2, dim=-1)
    d = dh.float()
    return torch.cat([d * u * activation_derivative(g, activation), d * activation_reference(g, activation)],
                     dim=-1).to(gu.dtype)


def _glu_fwd(gu: torch.Tensor, activation: str, backend: str = "auto") -> torch.Tensor:
    b, _ = resolve_backend(_OP, gu.device, gu.dtype, backend)
    if b is Backend.TRITON:
        from ..kernels import glu as kernels

        out = empty((gu.shape[0], gu.shape[1] // 2), dtype=gu.dtype, device=gu.device)
        kernels.glu_fwd(gu, out, activation)
        return out
    return glu_reference(gu, activation)


def _glu_fwd_fake(gu: torch.Tensor, activation: str, backend: str = "auto") -> torch.Tensor:
    return gu.new_empty((gu.shape[0], gu.shape[1] // 2))


def _glu_bwd_(dh: torch.Tensor, gu: torch.Tensor, activation: str, backend: str = "auto") -> None:
    b, _ = resolve_backend(_OP, gu.device, gu.dtype, backend)
    if b is Backend.TRITON:
        from ..kernels import glu as kernels

        kernels.glu_bwd_(dh, gu, activation)
        return
    # In place, few temporaries: the CPU path of a backward whose point is to save memory.
    n = gu.shape[1] // 2
    g = gu[:, :n].float()
    d = dh.float()
    d_gate = activation_derivative(g, activation).mul_(d).mul_(gu[:, n:])
    gu[:, n:].copy_(activation_reference(g, activation).mul_(d))
    gu[:, :n].copy_(d_gate)


def _glu_bwd_fake(dh: torch.Tensor, gu: torch.Tensor, activation: str, backend: str = "auto") -> None:
    return None


define("glu_fwd(Tensor gu, str activation, str backend='auto') -> Tensor", _glu_fwd, _glu_fwd_fake)
define("glu_bwd_(Tensor dh, Tensor(a!) gu, str activation, str backend='auto') -> ()", _glu_bwd_, _glu_bwd_fake)
