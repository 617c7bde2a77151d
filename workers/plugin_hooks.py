"""What the child process lends a running plugin without importing pyarrow itself (set by
:mod:`jetflow.workers.child`): the way to send ``ctx.progress`` and frames (an output's
stream) to the worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["send_frame", "send_progress"]

send_progress: Callable[[float, float | None], None] | None = None
send_frame: Callable[[dict[str, Any]], None] | None = None
