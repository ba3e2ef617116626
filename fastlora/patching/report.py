"""What a patch did, module by module, and how to take it back."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from .coverage import Coverage, CoverageReport


class Change(Protocol):
    """One recorded change of a patch: ``undo()`` takes it back."""

    def undo(self) -> None: ...


@dataclass
class ClassSwap:
    """A module whose class the patch swapped, and the instance attributes it added."""

    module: object
    original: type
    attrs: tuple[str, ...] = ()

    swapped: type | None = None  # the class the patch gave the module

    def undo(self) -> None:
        current = type(self.module)
        if self.swapped is None or current is self.swapped:
            self.module.__class__ = self.original
        else:  # another library put its own class on top since (FSDP2's FSDP<Class>): keep it, drop ours
            self.module.__class__ = _without(current, self.swapped, self.original)
        for name in self.attrs:
            self.module.__dict__.pop(name, None)


_REBUILT: dict[tuple[type, type], type] = {}


def _without(cls: type, ours: type, original: type) -> type:
    """``cls`` with the class ``ours`` replaced by ``original`` among its ancestors: the same name, bases and
    namespace otherwise (made once per pair). A class that does not derive from ``ours`` is returned as is."""
    if cls is ours:
        return original
    if ours not in cls.__mro__:
        return cls
    key = (cls, ours)
    if key not in _REBUILT:
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        rebuilt = type(cls)(cls.__name__, tuple(_without(b, ours, original) for b in cls.__bases__), namespace)
        rebuilt.__qualname__ = cls.__qualname__
        _REBUILT[key] = rebuilt
    return _REBUILT[key]


@dataclass
class AttrSet:
    """An instance attribute the patch set, and what was there before (if anything)."""

    obj: object
    name: str
    had: bool
    previous: object = None

    def undo(self) -> None:
        if self.had:
            self.obj.__dict__[self.name] = self.previous
        else:
            self.obj.__dict__.pop(self.name, None)


@dataclass
class PatchReport:
    """The modules :func:`fastlora.patch` changed and the ones it left alone, each with what or why.

    ``undo()`` restores the exact original behaviour (the original classes and attributes, in reverse order).
    The changes are kept as data, not closures, so a deep copy of a patched model holds a report that undoes
    the copy. ``coverage()`` says what ran since: each patched module counts its calls on fastlora's ops and its
    fallbacks.

    Example:
        >>> report = fastlora.patch(model)
        >>> print(report)              # a short table
        >>> print(report.coverage())   # after some steps: what really ran
        >>> report.undo()
    """

    model_type: str
    options: dict[str, object] = field(default_factory=dict, repr=False)
    patched: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list, repr=False)
    undone: bool = False
    counters: list[Coverage] = field(default_factory=list, repr=False)
    warned: set = field(default_factory=set, repr=False)  # fallback reasons already logged, for the whole model

    def track(self, name: str, op: str) -> Coverage:
        """A new call counter for the module ``name`` patched onto ``op``, listed in :meth:`coverage`."""
        counter = Coverage(name, op, warned=self.warned)
        self.counters.append(counter)
        return counter

    def coverage(self) -> CoverageReport:
        """The calls of every patched module since the patch: on fastlora's ops, fallbacks and why.

        Example:
            >>> report = fastlora.patch(model); model(**batch).loss.backward()
            >>> report.coverage().never_ran()
            []
        """
        return CoverageReport(self.model_type, list(self.counters))

    def swap_class(self, name: str, what: str, module: object, new_class: type, **attrs: object) -> None:
        """Give ``module`` the class ``new_class`` (and instance attributes ``attrs``), recorded for undo."""
        self.changes.append(ClassSwap(module, type(module), tuple(attrs), new_class))
        module.__class__ = new_class
        module.__dict__.update(attrs)
        self.patched.append((name, what))

    def set_attr(self, name: str | None, what: str, obj: object, attr: str, value: object) -> None:
        """Set an instance attribute, recorded for undo (listed as patched unless ``name`` is None)."""
        self.changes.append(AttrSet(obj, attr, attr in obj.__dict__, obj.__dict__.get(attr)))
        obj.__dict__[attr] = value
        if name is not None:
            self.patched.append((name, what))

    def add_change(self, change: Change) -> None:
        """Record a change made by other means (kept as data, like the others), undone in order with the rest."""
        self.changes.append(change)

    def skip(self, name: str, reason: str) -> None:
        """Record a module left alone, with the reason."""
        self.skipped.append((name, reason))

    def undo(self) -> None:
        """Revert every change, newest first; a second call does nothing."""
        if self.undone:
            return
        for change in reversed(self.changes):
            change.undo()
        self.changes.clear()
        self.undone = True

    def __str__(self) -> str:
        rows = [(name, "patched", what) for name, what in self.patched] + \
            [(name, "left alone", why) for name, why in self.skipped]
        width = max([len(r[0]) for r in rows] + [6])
        lines = [f"fastlora patch of a {self.model_type} model: {self._summary() or 'nothing patched'}; "
                 f"{len(self.skipped)} left alone{' (undone)' if self.undone else ''}"]
        lines += [f"  {name:<{width}}  {state:<10}  {detail}" for name, state, detail in rows]
        return "\n".join(lines)

    def _summary(self) -> str:
        """Patched modules by op; q/k/v layers that an attention's lora_qkv serves are counted there, not twice."""
        ops = Counter(c.op for c in self.counters)
        served = Counter(c.served_by.op for c in self.counters if c.served_by is not None)
        parts = [f"{op} on {n}" + (f" (computing {served[op]} of the layers' outputs)" if served[op] else "")
                 for op, n in ops.items()]
        if any(name == "checkpointing" for name, _ in self.patched):
            parts.append("offloaded checkpointing")
        return ", ".join(parts)
