"""The Python client.

::

    from jetflow import connect

    client = await connect("nats://127.0.0.1:4222")
    job_id = await client.submit("echo", {"x": 1}, queue="default", priority=5)
    job = await client.wait(job_id, timeout=30)   # a JobState: job.state, job.result ...
    await client.close()

``submit`` returns once the sentinel has recorded the job in the log (the reply to the
request carries its id) and raises :class:`SubmissionRejected` with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from jetflow.adapters import tracing
from jetflow.adapters.auth import Credentials
from jetflow.adapters.bus import (
    DIRECT_HEADERS,
    TIMEOUTS,
    BusError,
    Tail,
    last_job_event,
    messages_on,
    stored_seq,
)
from jetflow.adapters.bus import connect as bus_connect
from jetflow.adapters.natsclient import Client as RawClient
from jetflow.adapters.pipeline import NoResponders, Pipeline
from jetflow.adapters.runtime import cancel_and_wait
from jetflow.adapters.signatures import AnnouncedKeys
from jetflow.adapters.templates import Registered, TemplateStore
from jetflow.adapters.workflows import (
    list_workflows,
    load_template_file,
    read_view,
    start_body,
    wait_end,
)
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, Unreadable, decode_event, dumps, loads
from jetflow.core.events import Event
from jetflow.core.job import TERMINAL, JobState, fold_skipping
from jetflow.core.submission import derive_job_id
from jetflow.core.workflow_view import WorkflowView

__all__ = ["Client", "connect", "JobError", "NoSentinel", "SubmissionRejected", "SubmitTimeout",
           "Submitted", "SubmissionsRejected", "submission_request"]

log = logging.getLogger("jetflow.client")


class Submitted(NamedTuple):
    """What the sentinel answered a submission."""

    job_id: str
    duplicate: bool = False  # the job id existed already: this is that job
    differs: tuple[str, ...] = ()  # ...and this submission was not the same as it

    def warning(self) -> str:
        return (f"job {self.job_id} exists and was submitted with other "
                f"{', '.join(self.differs)}: it keeps its first submission (another "
                "--job-id submits a new job)")


class SubmissionRejected(Exception):
    """The sentinel refused the submission; ``code`` is machine-readable."""

    def __init__(self, reason: str, code: str = "", job_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.job_id = job_id


NOBODY_GRACE_S = 3.0  # how long "nothing listens" may last: a sentinel restarting


class NoSentinel(BusError):
    """Nothing answers the request: no sentinel runs at that server."""


class JobError(Exception):
    """A request about a job that cannot be done (no such job, wrong state...)."""


class SubmitTimeout(TimeoutError):
    """No sentinel answered in time (the submission is stored and will be processed)."""


async def connect(url: str | None = None, *, credentials: Credentials | None = None,
                  context: str | Path | None = None, **given: str) -> Client:
    """A client of the jetflow at ``url``. Credentials the NATS way: ``credentials``, or
    a nats CLI ``context`` file and/or fields of :class:`Credentials` (``user``,
    ``password``, ``token``, ``nkey``, ``creds``, ``ca``, ``cert``, ``key``) over the
    environment's (``JETFLOW_CONTEXT``, ``JETFLOW_USER``...)."""
    if credentials is None and (context is not None or given):
        unknown = set(given) - {f.name for f in dataclasses.fields(Credentials)}
        if unknown:
            raise TypeError(f"connect() got unknown credentials {sorted(unknown)}")
        credentials = Credentials.from_env(
            os.environ, **given, context=str(context) if context is not None else None)
    return Client(await bus_connect(url, name="jetflow-client", credentials=credentials))


WAIT_POLL_S = 2.0  # how often a waiting client looks at the log without a wake-up


class Client:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self._watcher: asyncio.Task[None] | None = None
        self._template_store: TemplateStore | None = None
        self._keys = AnnouncedKeys(nc)  # the workers' announced keys (origin checks)

    async def close(self) -> None:
        if self._watcher:
            await cancel_and_wait([self._watcher])
        if not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- submitting ---------------------------------------------------------------------
    async def submit(self, handler: str, args: Mapping[str, Any] | None = None, *,
                     queue: str = "default", priority: int = 0, job_id: str | None = None,
                     max_attempts: int | None = None, timeout_s: float | None = None,
                     queue_timeout_s: float | None = None, deadline_s: float | None = None,
                     retry: Mapping[str, float] | None = None,
                     correlation_id: str | None = None, msg_id: str | None = None,
                     headers: Mapping[str, str] | None = None,
                     reply_timeout_s: float = 10.0, input: str | None = None,
                     output: str | None = None) -> str:
        """Submit a job; return its id once it is in the log. A ``job_id`` that exists
        already returns that job (logged as a warning when this submission differs from
        it: :meth:`submit_result` says how)."""
        result = await self.submit_result(
            handler, args, queue=queue, priority=priority, job_id=job_id,
            max_attempts=max_attempts, timeout_s=timeout_s, queue_timeout_s=queue_timeout_s,
            deadline_s=deadline_s, retry=retry, correlation_id=correlation_id, msg_id=msg_id,
            headers=headers, reply_timeout_s=reply_timeout_s, input=input, output=output)
        if result.differs:
            log.warning("%s", result.warning())
        return result.job_id

    async def submit_result(self, handler: str, args: Mapping[str, Any] | None = None, *,
                            queue: str = "default", priority: int = 0,
                            job_id: str | None = None, max_attempts: int | None = None,
                            timeout_s: float | None = None,
                            queue_timeout_s: float | None = None,
                            deadline_s: float | None = None,
                            retry: Mapping[str, float] | None = None,
                            correlation_id: str | None = None, msg_id: str | None = None,
                            headers: Mapping[str, str] | None = None,
                            reply_timeout_s: float = 10.0, input: str | None = None,
                            output: str | None = None) -> Submitted:
        """:meth:`submit`, with what the sentinel said: whether the job existed already
        (``duplicate``) and in which fields this submission differs from it
        (``differs``: the job keeps what it was first submitted with)."""
        request = submission_request(
            handler, args, queue=queue, priority=priority, job_id=job_id,
            max_attempts=max_attempts, timeout_s=timeout_s, queue_timeout_s=queue_timeout_s,
            deadline_s=deadline_s, retry=retry, correlation_id=correlation_id, msg_id=msg_id,
            headers=headers, input=input, output=output)
        with tracing.outgoing(f"publish {request.subject}", request.headers,
                              attributes=request.attributes) as hdrs:
            found = await self._submitted(request.subject, request.body, hdrs,
                                          reply_timeout_s, job_id)
            tracing.annotate(job_id=found.job_id)
        return found

    async def submit_many(self, jobs: Iterable[Mapping[str, Any] | tuple[str, Mapping[str, Any]]],
                          *, window: int = 2048, reply_timeout_s: float = 60.0) -> list[str]:
        """Submit many jobs, pipelined (up to ``window`` unanswered at once); return their
        ids in order once every one is in the log. Each job is a mapping of
        :meth:`submit`'s arguments (``{"handler": "echo", "args": {...}, "priority":
        5}``) or a ``(handler, args)`` pair; validation and idempotency are
        :meth:`submit`'s (a ``job_id`` or ``msg_id`` submitted again is that job).
        Rejected submissions raise :class:`SubmissionsRejected` after the others are
        recorded; ones no sentinel answered in ``reply_timeout_s`` raise
        :class:`SubmitTimeout` (they stay stored and are recorded once one runs)."""
        requests = [_request_of(job) for job in jobs]
        if not isinstance(self.nc, RawClient):
            raise TypeError("submit_many needs a connection from jetflow's connect()")
        try:
            answers = await Pipeline(self.nc, window, grace_s=NOBODY_GRACE_S).run(
                [(r.subject, r.body, r.headers) for r in requests], reply_timeout_s)
        except NoResponders:
            raise NoSentinel(f"nothing listens on {S.PREFIX}.submit.* (for "
                             f"{NOBODY_GRACE_S:g}s): no jetflow sentinel is running there, or "
                             "one is still starting (start one, or `jetflow up`)") from None
        return _ids_of(requests, answers)

    async def _submitted(self, subject: str, body: bytes, hdrs: dict[str, str],
                         reply_timeout_s: float, job_id: str | None) -> Submitted:
        """Send the submission; the sentinel's answer, or raise."""
        reply = await self._request(subject, body, hdrs, reply_timeout_s)
        if reply is None:
            expected = job_id or derive_job_id(hdrs[S.HDR_MSG_ID], "", 0)
            raise SubmitTimeout(f"no sentinel answered within {reply_timeout_s:g}s; the "
                                f"submission is stored in {S.SUBMIT_STREAM} and job "
                                f"{expected} will be recorded once a sentinel runs")
        answer = loads(reply.data)
        if "error" in answer:
            raise SubmissionRejected(answer["error"], answer.get("code", ""),
                                     answer.get("job_id"))
        differs = answer.get("differs")
        return Submitted(str(answer["job_id"]), bool(answer.get("duplicate")),
                         tuple(str(f) for f in differs) if isinstance(differs, list) else ())

    async def _request(self, subject: str, body: bytes, headers: dict[str, str],
                       timeout_s: float, per_try_s: float = 2.0) -> Msg | None:
        """Ask until answered: a repeat carries the same Nats-Msg-Id, so JF_SUBMIT drops
        it as a duplicate while the sentinel answers it from what the log recorded (this
        covers a sentinel that was starting or restarting when the first request came).
        A request that cannot safely be repeated passes ``per_try_s=timeout_s``: it is
        sent again only when nothing received it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        nobody_since: float | None = None  # the server says nothing listens (not a stream)
        while (left := deadline - loop.time()) > 0:
            try:
                return await self.nc.request(subject, body, timeout=min(per_try_s, left),
                                             headers=headers)
            except TIMEOUTS:
                nobody_since = None
            except nats.errors.NoRespondersError:  # a sentinel restarting, or none at all
                nobody_since = nobody_since or loop.time()
                if loop.time() - nobody_since >= NOBODY_GRACE_S:
                    break
                await asyncio.sleep(min(0.25, max(left, 0.0)))
            except nats.errors.MaxPayloadError:
                raise BusError(f"the message to {subject} is {len(body):,} bytes, more than "
                               f"this server accepts ({self.nc.max_payload:,})") from None
        if nobody_since is not None:
            stored = ("" if not subject.startswith(f"{S.PREFIX}.submit.") else
                      f", and no {S.SUBMIT_STREAM} stream keeps submissions: nothing was "
                      "submitted")
            where = self.nc.connected_url.netloc if self.nc.connected_url else "?"
            raise NoSentinel(f"nothing listens on {subject} at {where} (for "
                             f"{NOBODY_GRACE_S:g}s): no jetflow sentinel is running there, "
                             f"or one is still starting{stored} (start one, or `jetflow up`)")
        return None

    # -- workflows ------------------------------------------------------------------------
    async def register_workflow(self, template: Mapping[str, Any] | str | Path, *,
                                by: str = "") -> Registered:
        """Validate and store a template (a document, or the path of a YAML file) as its
        next version; unchanged content is the version that has it (``created`` false)."""
        doc = template if isinstance(template, Mapping) else load_template_file(template)
        return await self._templates().register(doc, by=by)

    async def start_workflow(self, name: str, context: Any = None, *,
                             version: int | None = None, queue: str = "default",
                             workflow_id: str | None = None,
                             correlation_id: str | None = None,
                             reply_timeout_s: float = 10.0) -> str:
        """Start a workflow of a registered template (its latest version unless
        ``version``); return its id once its ``started`` is in the log. The same
        ``workflow_id`` again is the same workflow."""
        body, headers = start_body(name, context, version=version, workflow_id=workflow_id,
                                   correlation_id=correlation_id)
        subject = S.submit_subject(queue)
        with tracing.outgoing(f"publish {subject}", headers,
                              attributes={"jetflow.workflow": name}) as hdrs:
            reply = await self._request(subject, body, hdrs, reply_timeout_s)
        if reply is None:
            raise SubmitTimeout(f"no sentinel answered within {reply_timeout_s:g}s; the "
                                f"start is stored in {S.SUBMIT_STREAM} and will be "
                                "recorded once a sentinel runs")
        answer = loads(reply.data)
        if "error" in answer:
            raise SubmissionRejected(answer["error"], answer.get("code", ""))
        return str(answer.get("workflow_id") or answer["job_id"])

    async def workflow_status(self, workflow_id: str) -> WorkflowView:
        """The workflow and each of its steps, from the log (state ``unknown`` if the log
        has no such workflow)."""
        return await read_view(self.nc, self.js, self._templates(), workflow_id)

    async def wait_workflow(self, workflow_id: str, timeout: float | None = None
                            ) -> WorkflowView:
        """Wait until the workflow has ended (TimeoutError after ``timeout`` seconds);
        what it looks like then."""
        await wait_end(self.nc, S.check_job_id(workflow_id), timeout)
        return await self.workflow_status(workflow_id)

    async def cancel_workflow(self, workflow_id: str, reason: str | None = None
                              ) -> dict[str, Any]:
        """Ask a sentinel to cancel every pending and running step of the workflow."""
        body: dict[str, Any] = {"workflow_id": S.check_job_id(workflow_id)}
        if reason:
            body["reason"] = reason
        reply = await self._request(S.CONTROL_WF_CANCEL, dumps(body), {}, 10.0, 10.0)
        if reply is None:
            raise BusError("no sentinel answered the cancel in 10s")
        answer: dict[str, Any] = loads(reply.data)
        if "error" in answer:
            raise JobError(answer["error"])
        return answer

    async def workflows(self, *, state: str | None = None, name: str | None = None
                        ) -> list[dict[str, Any]]:
        """The workflows in the log, oldest first (``state``/``name`` to filter)."""
        return await list_workflows(self.js, state=state, name=name)

    async def templates(self) -> list[dict[str, Any]]:
        """Every registered template: its latest version's name, version, steps, sha256."""
        return await self._templates().names()

    def _templates(self) -> TemplateStore:
        if self._template_store is None:
            self._template_store = TemplateStore(self.nc)
        return self._template_store

    async def cancel(self, job_id: str, reason: str | None = None) -> dict[str, Any]:
        """Ask a sentinel to cancel: a queued job ends at once, a running one within ~2 s.
        Returns the sentinel's answer (``noop`` for a job that already finished)."""
        return await self._control(S.CONTROL_CANCEL, {"job_id": S.check_job_id(job_id),
                                                      "reason": reason})

    async def retry(self, job_id: str, attempts: int = 3) -> dict[str, Any]:
        """Re-drive a dead-lettered job with ``attempts`` more attempts."""
        return await self._control(S.CONTROL_RETRY, {"job_id": S.check_job_id(job_id),
                                                     "attempts": attempts})

    async def _control(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        # one try: the sentinel may be waiting to catch up with the job, and a repeat
        # would be judged after the first had acted ("cancel already requested")
        reply = await self._request(subject, dumps(body), {}, 10.0, per_try_s=10.0)
        if reply is None:
            raise SubmitTimeout(f"no sentinel answered on {subject}")
        answer: dict[str, Any] = orjson.loads(reply.data)
        if "error" in answer:
            raise JobError(answer["error"])
        return answer

    async def publish_raw(self, queue: str, body: bytes,
                          headers: Mapping[str, str] | None = None) -> None:
        """What ``nats pub jf.submit.<queue>`` does: no id back, no waiting."""
        await self.nc.publish(S.submit_subject(queue), body, headers=dict(headers or {}))

    # -- reading ------------------------------------------------------------------------
    async def history(self, job_id: str) -> list[Event]:
        """Every event of the job, straight from the stream, in order."""
        return [event for event, _headers in await self.history_with_headers(job_id)]

    async def history_with_headers(self, job_id: str) -> list[tuple[Event, dict[str, str]]]:
        """Every event of the job with the NATS headers it was stored with (trace
        context, correlation id, msg id), straight from the stream, in order."""
        return [(event, {k: v for k, v in (m.headers or {}).items()
                          if k not in DIRECT_HEADERS})
                for m in await self._messages(job_id) if isinstance(event := _read(m), Event)]

    async def history_report(self, job_id: str) -> tuple[list[Event], list[Unreadable]]:
        """The job's events, and the messages on its subjects that are not events (a
        hand-published body, a forged envelope) with the reason, both in stream order."""
        events: list[Event] = []
        unreadable: list[Unreadable] = []
        for msg in await self._messages(job_id):
            read = _read(msg)
            if isinstance(read, Event):
                events.append(read)
            else:
                unreadable.append(read)
        return events, unreadable

    async def _messages(self, job_id: str) -> list[Msg]:
        S.check_job_id(job_id)
        return await messages_on(self.js, [S.job_filter(job_id)])

    async def status(self, job_id: str) -> JobState:
        """The job's state folded from its history (state 'new' if it has no events), as
        the projector folds it: an event that may not happen is left out, and so is a
        worker's event that the worker it names did not sign (``AnnouncedKeys``)."""
        stored = [(event, m) for m in await self._messages(job_id)
                  if isinstance(event := _read(m), Event)]
        forged = await self._keys.unsigned(stored)
        return fold_skipping([e for e, _ in stored if e.seq not in forged], job_id)[0]

    async def last_event(self, job_id: str) -> Event | None:
        found = await last_job_event(self.nc, S.check_job_id(job_id))
        return None if found is None else decode_event(found[1], found[2], found[0])

    # -- waiting ------------------------------------------------------------------------
    async def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        """Wait until the job is terminal (succeeded, dead-lettered, rejected, cancelled);
        TimeoutError after ``timeout`` seconds. Woken by the job's events (a core
        subscription), and decided by what the log stores (a direct get), with a poll now
        and then for a message lost: it creates nothing on the server, so a submitter may."""
        S.check_job_id(job_id)
        moved = asyncio.Event()

        async def on_event(_msg: Msg) -> None:
            moved.set()

        sub = await self.nc.subscribe(S.job_filter(job_id), cb=on_event)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while True:
                moved.clear()
                last = await self.last_event(job_id)
                if last is not None and last.type in TERMINAL:
                    state = await self.status(job_id)
                    if state.terminal:  # not when that last event is a forgery
                        return state
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job_id} did not end within {timeout:g}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(moved.wait(), min(WAIT_POLL_S, left or WAIT_POLL_S))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def watch(self) -> None:
        """Start following terminal events (call it before submitting many jobs to wait
        for them with ``wait_terminal``; it reads through a consumer, which a submitter's
        credentials do not allow: ``wait`` does not need it)."""
        if self._watcher is not None:
            return
        head = (await self.js.stream_info(S.EVENTS_STREAM)).state.last_seq
        tail = Tail(self.js, S.EVENTS_STREAM, start_seq=head + 1,
                    filter_subjects=[f"{S.PREFIX}.job.*.{t}" for t in sorted(TERMINAL)])
        self.terminal: dict[str, Event] = {}
        self._terminal_changed = asyncio.Event()
        self._watcher = asyncio.create_task(self._follow(tail))

    async def _follow(self, tail: Tail) -> None:
        async for batch in tail.batches():
            for msg in batch:
                event = _read(msg)
                if not isinstance(event, Event):  # a forged message ends no job
                    continue
                self.terminal[event.id] = event
            if batch:
                self._terminal_changed.set()

    async def wait_terminal(self, job_ids: set[str], timeout: float) -> dict[str, Event]:
        """Wait until every job in ``job_ids`` has a terminal event seen since ``watch``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not job_ids <= self.terminal.keys():
            self._terminal_changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                missing = len(job_ids - self.terminal.keys())
                raise TimeoutError(f"{missing} of {len(job_ids)} jobs not finished in time")
            try:
                await asyncio.wait_for(self._terminal_changed.wait(), remaining)
            except TimeoutError:
                continue
        return {j: self.terminal[j] for j in job_ids}


class SubmissionRequest(NamedTuple):
    """One submission as it goes on the wire."""

    subject: str
    body: bytes
    headers: dict[str, str]
    job_id: str | None
    attributes: dict[str, Any]


def submission_request(handler: str, args: Mapping[str, Any] | None = None, *,
                       queue: str = "default", priority: int = 0, job_id: str | None = None,
                       max_attempts: int | None = None, timeout_s: float | None = None,
                       queue_timeout_s: float | None = None, deadline_s: float | None = None,
                       retry: Mapping[str, float] | None = None,
                       correlation_id: str | None = None, msg_id: str | None = None,
                       headers: Mapping[str, str] | None = None, input: str | None = None,
                       output: str | None = None) -> SubmissionRequest:
    """The subject, body and headers of a submission: a ``Nats-Msg-Id`` always (the
    ``job_id`` if given, else a new one), so a repeat is the same job. ``input`` and
    ``output`` are a plugin job's (paths as the workers see them)."""
    body: dict[str, Any] = {"handler": handler, "args": dict(args or {}), "priority": priority}
    for key, value in (("job_id", job_id), ("max_attempts", max_attempts),
                       ("timeout_s", timeout_s), ("queue_timeout_s", queue_timeout_s),
                       ("deadline_s", deadline_s), ("retry", retry),
                       ("correlation_id", correlation_id), ("input", input),
                       ("output", output)):
        if value is not None:
            body[key] = value
    msg_id = msg_id or job_id or uuid.uuid4().hex
    subject = S.submit_subject(queue)
    return SubmissionRequest(subject, dumps(body), {**(headers or {}), S.HDR_MSG_ID: msg_id},
                             job_id, _submit_attributes(subject, msg_id, body))


_SUBMIT_ARGS = frozenset({"handler", "args", "queue", "priority", "job_id", "max_attempts",
                          "timeout_s", "queue_timeout_s", "deadline_s", "retry",
                          "correlation_id", "msg_id", "headers", "input", "output"})


def _request_of(job: Mapping[str, Any] | tuple[str, Mapping[str, Any]]) -> SubmissionRequest:
    if isinstance(job, tuple):
        handler, args = job
        return submission_request(handler, args)
    unknown = set(job) - _SUBMIT_ARGS
    if unknown or "handler" not in job:
        raise TypeError(f"a job for submit_many is a mapping with 'handler' and any of "
                        f"{sorted(_SUBMIT_ARGS - {'handler'})}; got {sorted(job)}")
    return submission_request(**job)


def _ids_of(requests: list[SubmissionRequest], answers: list[bytes | None]) -> list[str]:
    """The job ids the answers give, in order; raise for rejections and silence."""
    ids: list[str | None] = []
    rejected: dict[int, SubmissionRejected] = {}
    unanswered: list[int] = []
    for i, raw in enumerate(answers):
        if raw is None:
            unanswered.append(i)
            ids.append(None)
            continue
        answer = orjson.loads(raw)
        if "error" in answer:
            rejected[i] = SubmissionRejected(answer["error"], answer.get("code", ""),
                                             answer.get("job_id"))
            ids.append(None)
        else:
            ids.append(str(answer["job_id"]))
    if rejected:
        raise SubmissionsRejected(rejected, ids)
    if unanswered:
        raise SubmitTimeout(f"no sentinel answered {len(unanswered)} of {len(requests)} "
                            f"submissions (the first: #{unanswered[0]}); they are stored in "
                            f"{S.SUBMIT_STREAM} and recorded once a sentinel runs")
    return [i for i in ids if i is not None]


class SubmissionsRejected(Exception):
    """Some submissions of :meth:`Client.submit_many` were rejected (``rejected``: by
    position); the others are in the log (``job_ids``: by position, None if rejected)."""

    def __init__(self, rejected: dict[int, SubmissionRejected],
                 job_ids: list[str | None]) -> None:
        first = min(rejected)
        super().__init__(f"{len(rejected)} of {len(job_ids)} submissions rejected; #{first}: "
                         f"{rejected[first].reason}")
        self.rejected = rejected
        self.job_ids = job_ids


def _submit_attributes(subject: str, msg_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {**tracing.messaging(subject, "publish", msg_id),
            **tracing.job_attributes(handler=body["handler"], job_id=body.get("job_id"),
                                     correlation_id=body.get("correlation_id"))}


def _read(msg: Msg) -> Event | Unreadable:
    """The event a stored message holds, or why it holds none."""
    seq = stored_seq(msg)
    try:
        return decode_event(msg.subject, msg.data, seq)
    except Exception as exc:  # noqa: BLE001 - whatever it is, it is not an event
        code = exc.code if isinstance(exc, CodecError) else "invalid"
        return Unreadable(seq, msg.subject, code, str(exc))
