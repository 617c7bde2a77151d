"""What the child process lends a running plugin without importing pyarrow itself: the
way to send ``ctx.progress`` to the worker (set by :mod:`jetflow.workers.child`)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["send_progress"]

send_progress: Callable[[float, float | None], None] | None = None
