"""The suites, in run order. The roofline comes first: every other suite's shares are taken against it.

A new suite is a module here with a ``SUITE = Suite(...)`` (see ``swiglu.py``: providers, modes, shapes for
GPU, CPU and quick runs, and a factory that builds each case), added to :data:`SUITES` below.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..harness import Suite
from . import cross_entropy, lora, lora_mlp, nf4, roofline, rope, swiglu

SUITES: dict[str, Suite] = {s.name: s for s in (roofline.SUITE, swiglu.SUITE, nf4.SUITE, rope.SUITE,
                                               cross_entropy.CE_SUITE, cross_entropy.FLCE_SUITE, lora.SUITE,
                                               lora_mlp.SUITE)}


def select(names: Iterable[str] | None = None) -> list[Suite]:
    """The suites named (each name may be a comma list), in run order, with the roofline always first.

    None or no names selects every suite. An unknown name raises ValueError listing the suites.

    Example:
        >>> [s.name for s in select(["swiglu"])]
        ['roofline', 'swiglu']
    """
    wanted = {n.strip() for name in (names or ()) for n in name.split(",") if n.strip()}
    unknown = sorted(wanted - SUITES.keys())
    if unknown:
        raise ValueError(f"unknown suite{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"(available: {', '.join(SUITES)})")
    return [s for name, s in SUITES.items() if not wanted or name in wanted or s is roofline.SUITE]
