"""One attempt at one job on this worker: ``claim -> execute -> record``.

While it runs, an attempt can be told to stop:

- ``cancel``: somebody asked (``cancel_requested``): kill the child, record ``cancelled``;
- ``lost``: the sentinel recorded ``timed_out`` (lease or deadline): kill the child and
  record nothing, the log has moved on;
- ``handback``: the worker is draining past its grace period: kill the child and hand
  the job back (``queued`` with ``handback``: it does not use up an attempt).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from jetflow.adapters.bus import Conflict, EventLog, messages_on, stored_seq
from jetflow.adapters.natsclient import Client
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, decode_event, dumps, loads
from jetflow.core.events import Event
from jetflow.core.job import TRANSITIONS
from jetflow.core.origin import SIG_HEADER, WORKER_SIGNED, sign
from jetflow.core.plugin import PluginError
from jetflow.workers.context import PermanentError
from jetflow.workers.envs import Environments
from jetflow.workers.plugin_cache import PluginCache
from jetflow.workers.pool import OUTPUT_STREAM, PROGRESS_STREAM, ChildPool, Outcome
from jetflow.workers.spans import traced_attempt, traced_claim, traced_record

if TYPE_CHECKING:
    from jetflow.workers.outputs import Receiver

__all__ = ["Attempt", "Deps"]

log = logging.getLogger("jetflow.worker")
MAX_RESULT_BYTES = 256 * 1024
APPEND_TRIES = 12  # about a minute of a server away, then the lease decides
# An outcome may still be recorded after these (they do not end the attempt).
_BENIGN = ("cancel_requested", "progress")
# the events a running job may get: any other is refused by the state machine
_AFTER_RUNNING = frozenset(t for t, states in TRANSITIONS.items() if "running" in states)
RECORDED = -1
LINES_PER_S = 2000  # an attempt's log lines: at most this many a second (a burst of 4x)...
MAX_LINES = 100_000  # ... and in all...
MAX_LOG_BYTES = 32 << 20  # ... and bytes: beyond, lines are dropped and counted
MAX_LINE_BYTES = 16 * 1024  # one line: beyond, it is cut and says so


def clip_line(line: str, limit: int = MAX_LINE_BYTES) -> str:
    """``line`` cut to about ``limit`` bytes of UTF-8, saying how long it was."""
    if 4 * len(line) <= limit:  # (at most 4 bytes a character: the usual line, unencoded)
        return line
    raw = line.encode()
    if len(raw) <= limit:
        return line
    kept = raw[:limit].decode(errors="ignore")
    return f"{kept}... [jetflow: line cut, {len(raw):,} bytes]"


class LineBudget:
    """How many more log lines an attempt may send (a token bucket and totals): a handler
    that prints a flood cannot stall its worker nor fill JF_LOGS."""

    def __init__(self) -> None:
        self.tokens = float(4 * LINES_PER_S)
        self.at = time.monotonic()
        self.lines = self.bytes = self.dropped = 0

    def take(self, size: int) -> bool:
        now = time.monotonic()
        self.tokens = min(4.0 * LINES_PER_S, self.tokens + (now - self.at) * LINES_PER_S)
        self.at = now
        if self.tokens < 1 or self.lines >= MAX_LINES or self.bytes + size > MAX_LOG_BYTES:
            self.dropped += 1
            return False
        self.tokens -= 1
        self.lines += 1
        self.bytes += size
        return True  # what _benign_head says when the outcome is in the log already


PLUGIN_REF = "jetflow.workers.plugin_run:run_plugin"  # (the child runs a plugin job itself)


@dataclass(frozen=True)
class Deps:
    """What an attempt needs from its worker."""

    nc: Client
    log: EventLog
    pool: ChildPool
    worker_id: str
    lease_s: float
    handlers: dict[str, str]
    plugins: PluginCache | None = None  # None: this worker runs no plugins
    outputs: Path = Path(".jetflow/outputs")  # where plugin outputs go by default
    envs: Environments | None = None  # plugins' environments (by their REQUIREMENTS)
    ipc: Path = Path(".jetflow/ipc")  # where a plugin's child makes its outputs' FIFOs


@dataclass
class Attempt:
    deps: Deps
    work: dict[str, Any]
    headers: dict[str, str]
    started_seq: int | None = None
    outcome: Outcome | None = None
    cancel_reason: str = "cancel requested"  # what the cancel request said
    # called once its child is free again (before the outcome is recorded): the worker
    # starts its next job then, so that job's claim and this record share a write
    child_free: Callable[[], None] = lambda: None
    _progress_next: dict[str, Any] | None = None
    _progress_task: asyncio.Future[None] | None = None
    _progress_head: int | None = None
    _progress_n: int = 0
    _lines: LineBudget = field(default_factory=lambda: LineBudget())
    _receiver: Receiver | None = None  # a plugin job's outputs, written by this worker
    stop: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def job_id(self) -> str:
        return str(self.work["job_id"])

    @property
    def number(self) -> int:
        return int(self.work["attempt"])

    def request_stop(self, reason: str) -> None:
        if not self.stop.done():
            self.stop.set_result(reason)

    @traced_attempt
    async def run(self) -> None:
        self.headers.pop(S.HDR_MSG_ID, None)
        self.started_seq = await self.claim()
        if self.started_seq is None:
            return
        self.outcome = await self.execute()
        self.child_free()
        await self._say_dropped()
        await self.record(self.outcome)

    # -- claim --------------------------------------------------------------------------
    @traced_claim
    async def claim(self) -> int | None:
        """Append ``started``; return its sequence, or None if somebody else moved first.

        A deduplicated ack on the first try is an earlier claim of this attempt (a stale
        offer): not ours to run again. On a retry after a lost ack, it is our own claim.
        """
        event = self._event("started", attempt=self.number, worker=self.deps.worker_id,
                            lease_s=self.deps.lease_s)
        for retry in range(APPEND_TRIES):
            try:
                ack = await self.deps.log.append(event, expected_seq=self.work["seq"],
                                                 headers=self.headers,
                                                 msg_id=self.msg_id("started"))
            except Conflict:
                log.debug("job %s attempt %d: claimed elsewhere or changed", self.job_id,
                          self.number)
                return None
            except Exception as exc:  # noqa: BLE001 - server away: the same msg id again
                await _pause(retry, exc, self.job_id, "claim")
                continue
            return ack.seq if retry or not ack.duplicate else None
        return None

    # -- execute ------------------------------------------------------------------------
    async def execute(self) -> Outcome:
        """Run the job in a child; a stop (cancel, lease lost, hand-back) kills the child
        and is the outcome."""
        try:
            job = await self._prepared()
        except PluginError as exc:
            return Outcome("failed", error={"error_type": "PluginError", "message": str(exc),
                                            "retryable": False})
        except Exception as exc:  # noqa: BLE001 - the store unreachable: try again later
            return Outcome("failed", error={"error_type": type(exc).__name__,
                                            "message": f"fetching the plugin: {exc}",
                                            "retryable": True})
        python = job.pop("python", None)
        run = (self.deps.pool.run_in(python, job, self._sink(), self.work.get("timeout_s"))
               if python else
               self.deps.pool.run(job, self._sink(), self.work.get("timeout_s")))
        running = asyncio.create_task(run)

        def stop(_done: asyncio.Future[str]) -> None:
            running.cancel()  # the pool kills the child
        self.stop.add_done_callback(stop)
        outcome: Outcome | None = None
        try:
            outcome = await self._written(await running)
            return outcome
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if self.stop.done() and running.cancelled() and not (this and this.cancelling()):
                return Outcome(self.stop.result())
            raise
        finally:
            self.stop.remove_done_callback(stop)
            if self._receiver is not None and (outcome is None or outcome.kind != "succeeded"):
                await self._receiver.discard()

    async def _written(self, outcome: Outcome) -> Outcome:
        """A plugin job's outcome with what this worker wrote: the outputs in the result
        once the child succeeded (or the writer's error); the writer's error in place of
        the child's when it broke the child's stream."""
        receiver = self._receiver
        if receiver is None:
            return outcome
        if outcome.kind == "failed":
            found = await receiver.failure()
            return outcome if found is None else _permanent(found)
        if outcome.kind != "succeeded":
            return outcome
        try:
            outputs = await receiver.finish()
        except PermanentError as exc:
            return _permanent(exc)
        except Exception as exc:  # noqa: BLE001 - the disk: full, gone, read-only
            return Outcome("failed", error={"error_type": type(exc).__name__,
                                            "message": f"writing the outputs: {exc}",
                                            "retryable": True})
        return replace(outcome, result={**outcome.result, "outputs": outputs})

    def _job(self) -> dict[str, Any]:
        w = self.work
        ref = PLUGIN_REF if w.get("plugin") else self.deps.handlers[w["handler"]]
        return {"job_id": w["job_id"], "attempt": w["attempt"],
                "ref": ref, "args": w.get("args") or {},
                "queue": w.get("queue", ""), "correlation_id": w.get("correlation_id"),
                "handler": w["handler"], **_trace_context(self.headers)}

    async def _prepared(self) -> dict[str, Any]:
        """The frame for the child; for a plugin job, with the pinned version's source
        fetched (verified, cached) and where its outputs go."""
        job = self._job()
        pin = self.work.get("plugin")
        if not pin:
            return job
        if self.deps.plugins is None:
            raise PluginError("this worker runs no plugins (--plugins none)")
        name = str(self.work["handler"])
        path = await self.deps.plugins.path(name, str(pin["version"]), str(pin["sha256"]))
        output = self.work.get("output") or str(self.deps.outputs / name)
        job["plugin"] = {"name": name, "version": pin["version"], "sha256": pin["sha256"],
                         "path": str(path), "input": self.work.get("input"),
                         "output": output, "ipc": str(self.deps.ipc)}
        meta = self.deps.plugins.meta(path)
        from jetflow.workers.outputs import Receiver  # pyarrow: once a plugin job comes

        self._receiver = Receiver({**job["plugin"], "outputs": meta.outputs,
                                   "max_quarantine": meta.max_quarantine},
                                  self.job_id, self.number)
        requirements = meta.requirements
        if requirements and self.deps.envs is not None:
            job["python"] = str(await self.deps.envs.python_for(requirements))
        return job

    def _sink(self) -> Any:
        subject = S.log_subject(self.job_id, self.number)
        nc = self.deps.nc

        def sink(stream: str, line: str) -> None:
            if stream == PROGRESS_STREAM:
                self._progress(loads(line))
                return
            if stream == OUTPUT_STREAM and self._receiver is not None:
                self._receiver.on_output(loads(line))
                return
            line = clip_line(line)
            if not self._lines.take(len(line)):
                return  # over the attempt's cap: counted, said once the attempt ends
            try:
                nc.publish_now(subject, line.encode(), headers={"Jf-Stream": stream, **tags})
            except Exception as exc:  # noqa: BLE001 - a line is not worth the attempt
                log.debug("job %s: a log line was not sent: %s", self.job_id, exc)
        tags = {S.HDR_CORRELATION_ID: str(self.work.get("correlation_id") or self.job_id)}
        return sink

    async def _say_dropped(self) -> None:
        """One last line when the cap dropped some: how many, and why."""
        if self._lines.dropped:
            note = (f"[jetflow] {self._lines.dropped} line(s) of this attempt dropped: over "
                    f"{LINES_PER_S} lines/s, {MAX_LINES} lines or {MAX_LOG_BYTES >> 20} MiB")
            await self.deps.nc.publish(S.log_subject(self.job_id, self.number),
                                       note.encode(), headers={"Jf-Stream": "jetflow"})

    def _progress(self, value: dict[str, Any]) -> None:
        """Record a ``progress`` event (the child sends a few a second at most); one at a
        time: while one is on its way, the newest waits and the older ones are dropped."""
        self._progress_next = value
        if self._progress_task is None or self._progress_task.done():
            self._progress_task = asyncio.ensure_future(self._record_progress())

    async def _record_progress(self) -> None:
        while self._progress_next is not None and self.outcome is None:
            value, self._progress_next = self._progress_next, None
            self._progress_n += 1
            event = self._event("progress", attempt=self.number, worker=self.deps.worker_id,
                                done=value.get("done"),
                                total=value.get("total"))
            try:
                ack = await self.deps.log.append(
                    event, expected_seq=self._progress_head or self.started_seq,
                    headers=self.headers, msg_id=f"{self.msg_id('progress')}:{self._progress_n}")
                self._progress_head = ack.seq
            except Exception as exc:  # noqa: BLE001 - progress is a hint: the outcome counts
                log.debug("job %s: progress not recorded: %s", self.job_id, exc)
                return

    # -- record -------------------------------------------------------------------------
    @traced_record
    async def record(self, outcome: Outcome) -> None:
        if outcome.kind == "lost":
            log.warning("job %s attempt %d: this worker lost the lease (the log recorded "
                        "that the attempt timed out); its process was stopped", self.job_id,
                        self.number)
            return
        event = self._outcome_event(outcome)
        expected = self.started_seq
        for retry in range(APPEND_TRIES):
            try:
                await self.deps.log.append(event, expected_seq=expected, headers=self.headers,
                                           msg_id=self.msg_id(event.type))
                log.debug("job %s attempt %d: %s recorded", self.job_id, self.number,
                          event.type)
                return
            except Conflict:
                expected = await self._benign_head(event)
                if expected == RECORDED:
                    log.debug("job %s attempt %d: %s recorded by an earlier try", self.job_id,
                              self.number, event.type)
                    return
                if expected is None:
                    break
            except Exception as exc:  # noqa: BLE001 - server away: the same msg id again
                await _pause(retry, exc, self.job_id, event.type)
        log.warning("job %s attempt %d: %s dropped, this worker lost the lease (another "
                    "event was recorded first)", self.job_id, self.number, event.type)

    async def _benign_head(self, mine: Event) -> int | None:
        """The latest sequence on the job if nothing recorded since our claim stops us from
        recording: a progress line, a cancel request (the outcome stands), a message the
        state machine would not apply to a running job (one published by hand), or one
        that cannot count: another worker's outcome (it does not hold the claim) or one in
        this worker's name that this worker did not sign. RECORDED when ``mine`` is there
        already: an earlier try went through but its ack was lost, and the server forgot
        its msg id (restarted) so the next try conflicted."""
        head = self.started_seq
        if head is None:
            return None
        for msg in await messages_on(self.deps.nc.jetstream(), [S.job_filter(self.job_id)],
                                     head + 1):
            seq = stored_seq(msg)
            try:
                event = decode_event(msg.subject, msg.data, seq)
            except CodecError:
                event = None
            if event is not None and not self._counts(event, msg):
                event = None
            if event is not None and _same_outcome(event, mine):
                return RECORDED
            if event is not None and event.type in _AFTER_RUNNING \
                    and event.type not in _BENIGN:
                return None  # timed out, cancelled, or finished by someone else
            head = seq
        return head

    def _counts(self, event: Event, msg: Msg) -> bool:
        """Whether the services would apply ``event`` as far as its author goes: not one
        naming another worker (the state machine refuses a non-holder's outcome), not
        one naming this worker unless signed with its key."""
        if event.type not in WORKER_SIGNED or event.data.get("worker") is None:
            return True
        if event.data["worker"] != self.deps.worker_id:
            return event.type == "started"  # a later claim (after a lease takeover)
        signer = self.deps.log.signer
        given = (msg.headers or {}).get(SIG_HEADER)
        return signer is None or given == sign(signer.key, msg.subject, msg.data)

    def _outcome_event(self, outcome: Outcome) -> Event:
        if outcome.kind == "cancel":  # the sentinel records it cancelled, seeing this
            return self._event("failed", attempt=self.number, worker=self.deps.worker_id,
                               error_type="Cancelled", message=self.cancel_reason,
                               retryable=False)
        if outcome.kind == "handback":
            return self._event("handed_back", attempt=self.number,
                               worker=self.deps.worker_id, reason="worker draining")
        return self._event(outcome.kind, **_outcome_data(outcome, self.number,
                                                          self.deps.worker_id))

    def _event(self, type_: str, **data: Any) -> Event:
        return Event("job", self.job_id, type_, time.time(), data)

    def msg_id(self, type_: str) -> str:
        return f"{self.job_id}:{type_}:{self.number}:{self.deps.worker_id}"


def _permanent(exc: PermanentError) -> Outcome:
    """A failure the worker found in what the plugin produced: not worth a retry."""
    return Outcome("failed", error={"error_type": "PermanentError", "message": str(exc),
                                    "retryable": False})


def _same_outcome(event: Event, mine: Event) -> bool:
    """``event`` records what ``mine`` would: same type, attempt and worker."""
    return event.type == mine.type and all(
        event.data.get(key) == mine.data.get(key) for key in ("attempt", "worker"))


def _trace_context(headers: dict[str, str]) -> dict[str, str]:
    """What the child needs to continue the trace (the attempt span's context)."""
    return {k: v for k in (S.HDR_TRACEPARENT, S.HDR_TRACESTATE) if (v := headers.get(k))}


async def _pause(retry: int, exc: Exception, job_id: str, what: str) -> None:
    log.warning("job %s: %s not acknowledged (%s: %s); trying again", job_id, what,
                type(exc).__name__, exc)
    await asyncio.sleep(min(5.0, 0.25 * 2 ** retry))


def _outcome_data(outcome: Outcome, attempt: int, worker_id: str) -> dict[str, Any]:
    data: dict[str, Any] = {"attempt": attempt, "worker": worker_id,
                            "duration_ms": outcome.duration_ms}
    if outcome.kind == "succeeded":
        result = outcome.result
        if len(dumps(result)) > MAX_RESULT_BYTES:
            result = {"truncated": True, "note": f"result over {MAX_RESULT_BYTES} bytes"}
        data["result"] = result
    elif outcome.kind == "timed_out":
        data.update(reason=outcome.error.get("message", "timeout"), kind="run")
    else:
        error = outcome.error
        data.update(error_type=str(error.get("error_type") or "Error"),
                    message=str(error.get("message") or ""),
                    retryable=bool(error.get("retryable", True)))
        for key in ("exit_code", "traceback"):
            if error.get(key) is not None:
                data[key] = error[key]
    return data
