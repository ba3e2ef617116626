"""What a patch did, module by module, and how to take it back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class PatchReport:
    """The modules :func:`fastlora.patch` changed and the ones it left alone, each with what or why.

    ``undo()`` restores the exact original behaviour (the original classes and attributes, in reverse order).

    Example:
        >>> report = fastlora.patch(model)
        >>> print(report)              # a short table
        >>> report.undo()
    """

    model_type: str
    patched: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    undone: bool = False

    def add(self, name: str, what: str, undo: Callable[[], None]) -> None:
        """Record a change and the action that reverts it."""
        self.patched.append((name, what))
        self._undo.append(undo)

    def skip(self, name: str, reason: str) -> None:
        """Record a module left alone, with the reason."""
        self.skipped.append((name, reason))

    def undo(self) -> None:
        """Revert every change, newest first; a second call does nothing."""
        if self.undone:
            return
        for action in reversed(self._undo):
            action()
        self._undo.clear()
        self.undone = True

    def __str__(self) -> str:
        rows = [(name, "patched", what) for name, what in self.patched] + \
            [(name, "left alone", why) for name, why in self.skipped]
        width = max([len(r[0]) for r in rows] + [6])
        lines = [f"fastlora patch of a {self.model_type} model: {len(self.patched)} patched, "
                 f"{len(self.skipped)} left alone{' (undone)' if self.undone else ''}"]
        lines += [f"  {name:<{width}}  {state:<10}  {detail}" for name, state, detail in rows]
        return "\n".join(lines)
