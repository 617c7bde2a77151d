"""Retry policy: what to do after a failed or timed-out attempt. Pure.

The caller passes the random number used for jitter, so the decision is a function of
its inputs and easy to test; the sentinel records the outcome (``retry_scheduled`` with
``not_before``, or ``dead_lettered``) and never recomputes it on replay.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from jetflow.core.job import JobState

__all__ = ["RetryPolicy", "Retry", "DeadLetter", "compute_backoff", "next_action",
           "policy_for"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 300.0
    jitter: float = 0.2  # the delay varies by up to this fraction, either way


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str


def compute_backoff(attempt: int, policy: RetryPolicy, rand: float) -> float:
    """Delay before the attempt after ``attempt`` (1-based): exponential, capped, jittered."""
    try:
        raw = min(policy.cap_s, policy.base_s * policy.factor ** max(0, attempt - 1))
    except OverflowError:
        raw = policy.cap_s
    spread = raw * policy.jitter * (2.0 * rand - 1.0)
    return max(0.0, min(policy.cap_s, raw + spread))


def policy_for(job: JobState, default: RetryPolicy) -> RetryPolicy:
    """The job's own retry settings (any subset) over the queue's or the default."""
    return replace(default, **job.retry) if job.retry else default


def next_action(job: JobState, policy: RetryPolicy, rand: float) -> Retry | DeadLetter:
    error = job.error or {}
    if error.get("retryable") is False:
        what = "timed out" if error.get("error_type") == "timeout" else "permanent error"
        return DeadLetter(f"{what}: {error.get('message', '')}".strip())
    if job.attempt >= job.max_attempts:
        return DeadLetter(f"gave up after {job.attempt} attempt(s): "
                          f"{error.get('message', 'unknown error')}")
    return Retry(compute_backoff(job.attempt, policy, rand))
