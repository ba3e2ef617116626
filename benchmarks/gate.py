"""The correctness gate: a provider's outputs against the reference's, within a tolerance for the dtype."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# (rtol, atol) per dtype: a little above one rounding of the output, since providers may order fp32
# operations differently (vectorised exp, fused multiply-adds) before rounding once.
DEFAULT_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def compare(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], rtol: float,
            atol: float, rms_share: float = 0.0) -> tuple[bool, float, str]:
    """The correctness gate: every output within ``atol + rtol * |reference| + rms_share * rms(reference)`` of its
    reference.

    ``rms_share`` is for outputs made by GEMMs chained through a low-precision intermediate (a gated MLP's
    activation rounded to bf16 before the down projection): rounding that intermediate moves each output element
    by a multiple of the dtype's epsilon times the output's scale, not its own size, so two correct computations
    differ most, relative to themselves, where an element is near zero.

    Returns:
        ``(agrees, max absolute error, why not)``.

    Example:
        >>> compare([torch.ones(3)], [torch.ones(3) + 1e-7], rtol=1e-4, atol=1e-5)
        (True, 1.1920928955078125e-07, '')
    """
    if len(outputs) != len(reference):
        return False, float("inf"), f"{len(outputs)} outputs, the reference has {len(reference)}"
    worst, why = 0.0, ""
    for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        if out.shape != ref.shape:
            return False, float("inf"), f"output {i} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
        o, r = out.detach().float(), ref.detach().float().to(out.device)
        err = (o - r).abs()
        floor = atol + rms_share * r.pow(2).mean().sqrt().item() if rms_share and r.numel() else atol
        # NaN compares false both ways: count it as an infinite error, not as a pass.
        err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
        if err.numel():
            worst = max(worst, err.max().item())
            bad = int((err > floor + rtol * r.abs()).sum().item())
            if bad and not why:
                share = f", rms_share={rms_share:g}" if rms_share else ""
                why = f"output {i}: {bad} of {err.numel()} elements outside rtol={rtol:g}, atol={atol:g}{share}"
    return not why, worst, why
