"""What a handler receives besides its arguments, and the error that skips retries."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["JobContext", "PermanentError"]


class PermanentError(Exception):
    """Raise from a handler when retrying cannot help: the job is dead-lettered at once."""


@dataclass(frozen=True, slots=True)
class JobContext:
    job_id: str
    attempt: int
    correlation_id: str | None
    queue: str
