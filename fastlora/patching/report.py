"""What a patch did, module by module, and how to take it back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Change(Protocol):
    """One recorded change of a patch: ``undo()`` takes it back."""

    def undo(self) -> None: ...


@dataclass
class ClassSwap:
    """A module whose class the patch swapped, and the instance attributes it added."""

    module: object
    original: type
    attrs: tuple[str, ...] = ()

    def undo(self) -> None:
        self.module.__class__ = self.original
        for name in self.attrs:
            self.module.__dict__.pop(name, None)


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
    the copy.

    Example:
        >>> report = fastlora.patch(model)
        >>> print(report)              # a short table
        >>> report.undo()
    """

    model_type: str
    options: dict[str, object] = field(default_factory=dict, repr=False)
    patched: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list, repr=False)
    undone: bool = False

    def swap_class(self, name: str, what: str, module: object, new_class: type, **attrs: object) -> None:
        """Give ``module`` the class ``new_class`` (and instance attributes ``attrs``), recorded for undo."""
        self.changes.append(ClassSwap(module, type(module), tuple(attrs)))
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
        lines = [f"fastlora patch of a {self.model_type} model: {len(self.patched)} patched, "
                 f"{len(self.skipped)} left alone{' (undone)' if self.undone else ''}"]
        lines += [f"  {name:<{width}}  {state:<10}  {detail}" for name, state, detail in rows]
        return "\n".join(lines)
