"""Run-time coverage of a patch: for every patched module, how many calls ran fastlora's ops and how many fell back
to the original code, and why.

A patch that reports "patched" proves nothing about what runs: a trainer may call its own forward around the model
(TRL's fused head), a wrapper may strip a weight's quantization state (FSDP2), a library may repack a weight
(bitsandbytes on a CPU). So each patched module counts its calls. A fallback with an unexpected reason logs one
warning per reason and model (logger ``fastlora``); calls with nothing to fuse (adapters disabled or merged) are
counted apart and never warn. A forward without labels computes no loss, so the loss counts nothing then.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from .._logging import logger

# True while a measurement runs a module's ways of computing a call (fastlora.tuning): those calls are not counted.
_PAUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("fastlora_coverage_paused", default=False)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Count no call inside (a measurement's runs are not the model's calls)."""
    token = _PAUSED.set(True)
    try:
        yield
    finally:
        _PAUSED.reset(token)


@dataclass
class Coverage:
    """The calls of one patched module since the patch.

    Attributes:
        name: the module's name in the model (``""`` for the model itself).
        op: what the patch put there (``"lora_linear"``, ``"lora_qkv"``, ``"lora_mlp"``, ``"apply_rope"``, ``"loss"``).
        ran: calls that ran fastlora's ops, by op.
        fell_back: calls that ran the original code instead, by reason.
        idle: calls with nothing for fastlora to do (no active adapter), by reason.
        measured: calls that ran the original code because measuring found it faster here (fastlora.tuning), by
            reason: a decision, not a lost fast path.
        served_by: for a layer whose output a fused module computes (q/k/v in ``lora_qkv``, the projections of a
            ``lora_mlp``), that module's counter: the layer runs fastlora's ops when it does, without a call of
            its own.
    """

    name: str
    op: str
    ran: Counter = field(default_factory=Counter)
    fell_back: Counter = field(default_factory=Counter)
    idle: Counter = field(default_factory=Counter)
    measured: Counter = field(default_factory=Counter)
    served_by: Coverage | None = None
    warned: set = field(default_factory=set, repr=False)  # shared by the modules of one patch

    @property
    def ran_fastlora(self) -> bool:
        """Whether fastlora's ops computed this module's output at least once (itself, or the module serving it)."""
        return bool(self.ran) or (self.served_by is not None and bool(self.served_by.ran))

    @property
    def calls(self) -> int:
        """Every call counted, whatever path it took."""
        return sum(self.ran.values()) + sum(self.fell_back.values()) + sum(self.idle.values()) + \
            sum(self.measured.values())

    def hit(self, op: str | None = None) -> None:
        """Count one call that ran fastlora's ``op`` (default: this module's op)."""
        if _PAUSED.get():
            return
        self.ran[op or self.op] += 1

    def fallback(self, reason: str) -> None:
        """Count one call that ran the original code; the first such call of a reason (per patch) warns."""
        if _PAUSED.get():
            return
        self.fell_back[reason] += 1
        if reason not in self.warned:
            self.warned.add(reason)
            logger.warning("fastlora: %s (%s) ran the original code instead of fastlora's: %s. Later fallbacks "
                           "for this reason are only counted (fastlora.patching.coverage(model))",
                           self.name or "the model", self.op, reason)

    def nothing_to_do(self, reason: str) -> None:
        """Count one call that had nothing for fastlora to do (not a fallback: no warning)."""
        if _PAUSED.get():
            return
        self.idle[reason] += 1

    def chose_original(self, reason: str) -> None:
        """Count one call that ran the original code because it measured faster here (no warning)."""
        if _PAUSED.get():
            return
        self.measured[reason] += 1


@dataclass
class CoverageReport:
    """Every patched module's :class:`Coverage`, in patch order.

    Example:
        >>> cov = fastlora.patching.coverage(model)
        >>> print(cov)                      # a table: module, op, calls on fastlora, fallbacks and why
        >>> assert not cov.never_ran()      # every patched module ran fastlora's ops at least once
    """

    model_type: str
    modules: list[Coverage]

    def never_ran(self) -> list[Coverage]:
        """The modules that have not run fastlora's ops once since the patch (those that measured the original code
        faster, and ran it, are not among them: that was a decision)."""
        return [c for c in self.modules if not c.ran_fastlora and not c.measured]

    def fell_back(self) -> dict[str, int]:
        """Fallback calls by reason, over all modules."""
        total: Counter = Counter()
        for c in self.modules:
            total.update(c.fell_back)
        return dict(total)

    def ran(self) -> dict[str, int]:
        """Calls that ran fastlora's ops, by op, over all modules."""
        total: Counter = Counter()
        for c in self.modules:
            total.update(c.ran)
        return dict(total)

    def __str__(self) -> str:
        ran = ", ".join(f"{op} {n}" for op, n in self.ran().items()) or "none"
        lines = [f"fastlora coverage of a {self.model_type} model: {len(self.modules)} patched modules, "
                 f"{len(self.never_ran())} never ran fastlora's ops; calls on fastlora: {ran}"]
        width = max([len(c.name) for c in self.modules] + [6])
        for c in self.modules:
            done = ", ".join(f"{op} {n}" for op, n in c.ran.items()) or "0"
            if c.served_by is not None:
                done += f" (and served by {c.served_by.name}'s {c.served_by.op})"
            rest = [f"fell back {n}: {why}" for why, n in c.fell_back.items()]
            rest += [f"nothing to do {n}: {why}" for why, n in c.idle.items()]
            rest += [f"original code {n}: {why}" for why, n in c.measured.items()]
            lines.append(f"  {c.name or '(model)':<{width}}  {c.op:<11}  {done}{'; ' if rest else ''}"
                         f"{'; '.join(rest)}")
        return "\n".join(lines)
