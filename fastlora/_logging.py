"""The library's logger: everything fastlora reports goes through the ``fastlora`` logger, never print."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("fastlora")

_seen: set[tuple[str, object]] = set()
_seen_lock = threading.Lock()


def log_once(level: int, key: object, msg: str, *args: object) -> None:
    """Log ``msg`` at ``level`` the first time ``key`` is seen in this process.

    Dispatch decisions are taken on every call of an op; their reasons are worth reading once, not per call.
    """
    with _seen_lock:
        if (msg, key) in _seen:
            return
        _seen.add((msg, key))
    logger.log(level, msg, *args)
