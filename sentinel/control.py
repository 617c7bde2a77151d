"""Operator requests the sentinel answers: cancel a job or a workflow, re-drive a dead
letter.

Both arrive on ``jf.ctl.*`` (from the CLI, the client or a raw ``nats req``) and become
events appended with the expected sequence, like every other decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS

from jetflow.adapters.bus import Conflict, job_messages_after, last_event_on
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, decode_event
from jetflow.core.events import Event
from jetflow.core.fleet import Append, Fleet
from jetflow.core.job import NEW, TERMINAL, JobState, fold_skipping

__all__ = ["Control"]

Answer = dict[str, Any]


class Control:
    """Answers requests from the sentinel's view (``fleet``), reading the log through
    ``nc`` and recording a decision with ``append`` (the sentinel's expected-sequence
    append, which raises :class:`Conflict` when the job moved)."""

    def __init__(self, fleet: Fleet, nc: NATS,
                 append: Callable[[Append], Awaitable[None]]) -> None:
        self.fleet = fleet
        self.nc = nc
        self.append = append

    async def cancel(self, job_id: str, body: dict[str, Any]) -> Answer:
        reason = str(body.get("reason") or "cancel requested")[:500]
        await self._seen_latest(job_id)
        for _ in range(3):
            job = self.fleet.jobs.get(job_id)
            if job is None or job.terminal:
                return await self._not_active(job_id, "cancel")
            if job.cancel_requested:
                return {"job_id": job_id, "state": job.state, "message": "cancel already "
                        "requested"}
            event = Event("job", job_id, "cancel_requested", _now(), {"reason": reason})
            append = Append(event, job.last_seq, f"{job_id}:cancel_requested:{job.last_seq}")
            if await self._try(append):
                return {"job_id": job_id, "state": "cancel_requested",
                        "running": job.state == "running"}
        return {"error": f"job {job_id} kept changing; try again"}

    async def cancel_workflow(self, workflow_id: str, body: dict[str, Any]) -> Answer:
        """Record the workflow's ``cancel_requested``: the sentinel then cancels every
        pending and running step, and the workflow ends ``cancelled``."""
        reason = str(body.get("reason") or "workflow cancelled")[:500]
        filter_ = S.entity_filter("wf", workflow_id)
        for _ in range(3):
            latest = await self._seen_latest_on(filter_)
            run = self.fleet.workflows.runs.get(workflow_id)
            if run is None:
                if latest is None:
                    return {"error": f"no workflow {workflow_id!r} in the log"}
                state = latest[1].rsplit(".", 1)[-1]
                if state in ("succeeded", "failed", "cancelled"):
                    return {"workflow_id": workflow_id, "state": state, "noop": True,
                            "message": f"workflow {workflow_id} already {state}: nothing to "
                                       "cancel"}
                return {"error": f"workflow {workflow_id} is not running here yet; try again"}
            if run.cancel_requested:
                return {"workflow_id": workflow_id, "state": "running",
                        "message": "cancel already requested"}
            event = Event("wf", workflow_id, "cancel_requested", _now(), {"reason": reason})
            append = Append(event, run.last_seq, f"wf:{workflow_id}:cancel_requested")
            if await self._try(append):
                return {"workflow_id": workflow_id, "state": "cancel_requested"}
        return {"error": f"workflow {workflow_id} kept changing; try again"}

    async def retry(self, job_id: str, body: dict[str, Any]) -> Answer:
        attempts = body.get("attempts", 3)
        if type(attempts) is not int or not 1 <= attempts <= 100:
            return {"error": "'attempts' must be an integer from 1 to 100"}
        await self._seen_latest(job_id)
        for _ in range(3):
            job = self.fleet.jobs.get(job_id)
            if job is None or job.state != "dead_lettered":
                return await self._not_active(job_id, "retry", job)
            event = Event("job", job_id, "queued", _now(),
                          {"attempt": job.attempt + 1, "max_attempts": job.attempt + attempts,
                           "redrive": True})
            append = Append(event, job.last_seq, f"{job_id}:redrive:{job.attempt}")
            if await self._try(append):
                return {"job_id": job_id, "state": "queued", "attempt": job.attempt + 1,
                        "max_attempts": job.attempt + attempts}
        return {"error": f"job {job_id} kept changing; try again"}

    async def _seen_latest(self, job_id: str, timeout_s: float = 3.0) -> None:
        """Wait (a moment, at most ``timeout_s``) until the sentinel has read the job's latest
        message in the log: a request right after an outcome its sender saw (``wait``, then
        ``retry``) is judged on that outcome, not on the view just before it (a client can
        see an event in the stream before the sentinel that appended it has its ack)."""
        await self._seen_latest_on(S.job_filter(job_id), timeout_s)

    async def _seen_latest_on(self, subject_filter: str, timeout_s: float = 3.0
                              ) -> tuple[int, str, bytes] | None:
        """The latest message on ``subject_filter``, once the sentinel has read it (or
        after ``timeout_s``: judged on what it has; its answer says to try again if it
        lags)."""
        latest = await last_event_on(self.nc, subject_filter)
        deadline = time.monotonic() + timeout_s
        while latest and self.fleet.tail_seq < latest[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return latest

    async def _try(self, append: Append) -> bool:
        try:
            await self.append(append)
            return True
        except Conflict:
            await asyncio.sleep(0.05)  # the tail brings what moved; look again
            return False

    async def _not_active(self, job_id: str, verb: str, job: JobState | None = None) -> Answer:
        if job is not None and not job.terminal:
            return {"error": f"job {job_id} is {job.state}; only dead-lettered jobs can be "
                             "retried"}
        state = await self._state_in_log(job_id)
        if state == NEW:
            return {"error": f"no job {job_id!r} in the log"}
        if verb == "retry" and state != "dead_lettered":
            return {"error": f"job {job_id} is {state}; only dead-lettered jobs can be retried"}
        if state in TERMINAL:
            return {"job_id": job_id, "state": state, "noop": True,
                    "message": f"job {job_id} already {state}: nothing to {verb}"}
        return {"error": f"job {job_id} is {state}; the sentinel has not caught up, try again"}


    async def _state_in_log(self, job_id: str) -> str:
        """The job's state folded from its messages in the log, as the projector folds
        them (a message published by hand that is no event, or that may not happen, is
        left out): for a job the sentinel does not hold, finished or never submitted."""
        events = []
        for seq, subject, data in await job_messages_after(self.nc, job_id, 0):
            with contextlib.suppress(CodecError):
                events.append(decode_event(subject, data, seq))
        return fold_skipping(events, job_id)[0].state


def _now() -> float:
    return time.time()
