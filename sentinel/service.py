"""The sentinel: the control plane's adapter around :class:`jetflow.core.fleet.Fleet`.

It rebuilds the fleet from JF_EVENTS on start, then runs four supervised loops: the event
tail (observe), the intake (JF_SUBMIT -> ``submitted``/``rejected``), a ticker (retries
whose delay is over, silent workers) and the heartbeat tail. After each of them it
*pumps*: asks the fleet what to record next and appends it, pipelined, every append
carrying the expected subject sequence so that several sentinels can run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import deque
from dataclasses import replace
from typing import NamedTuple

from nats.aio.msg import Msg

from jetflow.adapters.auth import Credentials
from jetflow.adapters.bus import (
    FIRST_CONNECT_WAIT_S,
    TIMEOUTS,
    Ack,
    BusError,
    Conflict,
    EventLog,
    Publisher,
    Tail,
    connect,
    ensure_streams,
    job_event_of_type,
    last_job_event,
    submit_consumer,
)
from jetflow.adapters.reader import Delivery, QueueReader, StreamReader
from jetflow.adapters.runtime import cancel_and_wait, give_back_memory, supervise
from jetflow.adapters.templates import TemplateStore
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, decode_event, dumps, loads
from jetflow.core.events import Event
from jetflow.core.fleet import Append, Dispatch, Fleet
from jetflow.core.job import IllegalTransition, JobState, apply
from jetflow.core.metadata import Stored, ack_numbers, header_value, headers_of
from jetflow.core.origin import SIG_HEADER, Origin, Signer, sentinel_key
from jetflow.core.retry import RetryPolicy
from jetflow.core.submission import (
    differing_fields,
    header_problem,
    submission_fingerprint,
)
from jetflow.core.template import TemplateError
from jetflow.sentinel.control import Control
from jetflow.sentinel.intake import Decision, Intake, RawSubmission
from jetflow.sentinel.replies import ReplyBook
from jetflow.sentinel.snapshots import Snapshots
from jetflow.sentinel.spans import SentinelSpans

__all__ = ["Sentinel"]

log = logging.getLogger("jetflow.sentinel")

_TASK = "sentinel-"  # its tasks' names: sentinel-events, sentinel-intake...


class Sentinel:
    def __init__(self, url: str | None = None, *, lease_s: float = 15.0, tick_s: float = 0.2,
                 batch: int = 256, policy: RetryPolicy | None = None,
                 queue_policies: dict[str, RetryPolicy] | None = None,
                 reconcile_s: float = 5.0, wait_nats_s: float = FIRST_CONNECT_WAIT_S) -> None:
        self.url = url
        self.wait_nats_s = wait_nats_s
        self.reconcile_s = reconcile_s
        self.tick_s = tick_s
        self.batch = batch
        self.policy = policy or RetryPolicy()
        self.queue_policies = dict(queue_policies or {})
        self.lease_s = lease_s
        self.fleet = Fleet(policy=self.policy, lease_s=lease_s,
                           queue_policies=self.queue_policies)
        self.replies = ReplyBook()
        self._taking_requests = False  # (catching up with the log, nobody waits yet)
        self.trace: dict[str, dict[str, str]] = {}  # job id -> trace/correlation headers
        self.spans = SentinelSpans()
        self._wake = asyncio.Event()
        self._inflight: set[str] = set()  # ids with an append on its way
        # requests with a msg id not answered at once: (when to look again, fingerprint, it)
        self._unanswered: deque[tuple[float, str, _Request]] = deque()
        self._tasks: list[asyncio.Task[None]] = []
        self.sid = secrets.token_hex(4)  # the acks of early offers name this sentinel

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> Sentinel:
        try:
            await self._open()
        except BaseException:  # cancelled (a stop signal) or failed: leave nothing open
            await self.stop()
            raise
        for name, loop in (("events", self._events_loop), ("intake", self._intake_loop),
                           ("ticker", self._tick_loop), ("heartbeats", self._hb_loop),
                           ("pumper", self._pump_loop), ("snapshots", self._snapshot_loop)):
            self._tasks.append(asyncio.create_task(supervise(name, loop), name=_TASK + name))
        log.info("sentinel ready: %d active jobs, %d workers, log at seq %d",
                 len(self.fleet.jobs), len(self.fleet.workers), self.fleet.last_seq)
        self.wake()
        return self

    async def _open(self) -> None:
        """Connect, catch up with the log and subscribe: everything before the loops."""
        self.nc = await connect(self.url, name="jetflow-sentinel", wait_s=self.wait_nats_s)
        self.js = self.nc.jetstream()
        await ensure_streams(self.js)
        secret = Credentials.from_env().secret_bytes()
        self.origin = Origin(secret)  # who wrote the events a worker may append
        self.log = EventLog(Publisher(self.nc),
                            signer=Signer(sentinel_key(secret)) if secret else None)
        await self.log.publisher.also_settle_on(S.work_acks_for(self.sid))
        info = await self.js.stream_info(S.SUBMIT_STREAM)
        self.intake = Intake(info.created.isoformat() if info.created else "0")
        self.templates = TemplateStore(self.nc)
        self.snapshots = Snapshots(self.nc, policy=self.policy,
                                   queue_policies=self.queue_policies, lease_s=self.lease_s)
        restored = await self.snapshots.load()
        if restored is not None:  # fold only what came after it
            self.fleet = restored
        self.control = Control(self.fleet, self.nc, self.append_decision)
        self.events = StreamReader(self.nc, S.EVENTS_STREAM, batch=self.batch, eager=True,
                                   start_seq=self.fleet.last_seq + 1)
        await self._catch_up()
        if self.snapshots.due(self.fleet):  # a long fold: the next start need not repeat it
            await self.snapshots.save(self.fleet)
        await self.nc.subscribe_raw(S.SUBMIT_WILDCARD, self._on_request,
                                    queue=S.SENTINEL_REPLY_GROUP)
        self._taking_requests = True
        await self.nc.subscribe(S.SENTINEL_PING, queue=S.SENTINEL_REPLY_GROUP,
                                cb=self._on_ping)
        for subject in (S.CONTROL_CANCEL, S.CONTROL_RETRY, S.CONTROL_WF_CANCEL):
            await self.nc.subscribe(subject, queue=S.SENTINEL_REPLY_GROUP, cb=self._on_control)
        await self.nc.flush()  # the server knows about us before we say we are ready

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            if self.snapshots.due(self.fleet):
                await self._when_covering_a_prefix(1.0)
                if self.fleet.covers_prefix():
                    await self.snapshots.save(self.fleet)
                else:
                    log.info("snapshot put off: the tail is behind this sentinel's appends "
                             "(at seq %d of %d)", self.fleet.tail_seq, self.fleet.last_seq)
            give_back_memory()

    async def _when_covering_a_prefix(self, timeout_s: float) -> None:
        """Wait (a little) for the tail to pass the appends whose acks were applied ahead
        of it: only then is the state a snapshot of the log up to a sequence."""
        deadline = time.monotonic() + timeout_s
        while not self.fleet.covers_prefix() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        started = bool(self._tasks)
        tail = [t for t in self._tasks if t.get_name() == _TASK + "events"]
        await cancel_and_wait([t for t in self._tasks if t not in tail])  # no new appends
        if tail and not tail[0].done() and not self.nc.is_closed:
            await self._when_covering_a_prefix(1.0)  # the tail reads the last ones
        await cancel_and_wait(tail)
        if started and self.fleet.last_seq != self.snapshots.saved_seq:
            # what it knows now, if that is a prefix of the log: the next start folds
            # nothing it folded
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.snapshots.save(self.fleet), 3.0)
        self._tasks.clear()
        nc = getattr(self, "nc", None)  # None when stopped while it was connecting
        if nc is not None and not nc.is_closed:
            await nc.close()

    async def __aenter__(self) -> Sentinel:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _catch_up(self) -> None:
        """Fold the log up to its head as it is now (later events come with the tail)."""
        head = (await self.js.stream_info(S.EVENTS_STREAM)).state.last_seq
        if head <= self.fleet.last_seq:
            return
        async for batch in self.events.batches():
            await self._load_templates_of(batch)
            self._observe_batch(batch)
            if self.events.caught_up or self.fleet.tail_seq >= head:
                break

    # -- observing ----------------------------------------------------------------------
    async def _events_loop(self) -> None:
        async for batch in self.events.batches():
            if batch:
                await self._load_templates_of(batch)
                self._observe_batch(batch)
                await self._dispatch(self.fleet.dispatch(time.time()))  # freed slots
            if self.fleet.dirty or self.fleet.workflows.dirty:
                self.wake()

    def _observe_batch(self, msgs: list[Stored]) -> None:
        for msg in msgs:
            seq = msg.seq
            if not self.fleet.read_by_tail(seq):  # our own append, applied when acked
                continue
            try:
                event = decode_event(msg.subject, msg.data, seq)
            except CodecError as exc:
                self.fleet.last_seq = max(self.fleet.last_seq, seq)
                where = S.parse_event_subject(msg.subject)
                if where is not None and where[0] == "job":
                    self.fleet.stored_on_job(where[1], seq)
                log.warning("ignoring malformed event at seq %d on %s: %s", seq, msg.subject,
                            exc.message)
                continue
            if self._forged(event, msg):
                continue
            if (event.type == "submitted" or event.kind == "wf") and msg.headers:
                headers = headers_of(msg.headers)
                correlation_id = (headers.get(S.HDR_CORRELATION_ID)
                                  or event.get("correlation_id") or event.id)
                self.trace[event.id] = Intake.trace_headers(headers, correlation_id)
            self._observe(event)

    def _forged(self, event: Event, msg: Stored) -> bool:
        """An event a worker may append that its signature says someone else wrote: not
        applied (the job's next append expects it), and logged."""
        if not self.origin.checks(event):
            return False
        why = self.origin.refusal(event, msg.subject, msg.data,
                                  header_value(msg.headers, SIG_HEADER))
        if why is None:
            return False
        self.fleet.stored_on_job(event.id, event.seq)
        log.warning("refused %s of job %s at seq %d: %s", event.type, event.id, event.seq,
                    why)
        return True

    def _observe(self, event: Event, duplicate: bool = False, own: bool = False) -> None:
        why = self.fleet.observe(event, own=own)
        self.spans.observed(event)
        if why:
            log.debug("not applied: %s %s seq %d: %s", event.id, event.type, event.seq, why)
        if duplicate and event.type == "submitted":  # its id was taken: say if it differs
            asyncio.ensure_future(self._answer_duplicate(event))
        elif event.type in ("submitted", "rejected") or (event.kind == "wf"
                                                         and event.type == "started"):
            self._answer(event, duplicate)
        if event.kind == "job" and event.id not in self.fleet.jobs:
            self.trace.pop(event.id, None)

    # -- deciding and acting --------------------------------------------------------------
    async def pump(self) -> None:
        """Record every decision the fleet has pending, then offer ready jobs to free slots."""
        for _ in range(4):
            appends = self._take_decisions(time.time())
            if not appends:
                break
            await self._execute(appends)
        await self._dispatch(self.fleet.dispatch(time.time()))

    def wake(self) -> None:
        """Ask the pumper to look at the dirty jobs."""
        self._wake.set()

    async def _pump_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.pump()

    def _take_decisions(self, now: float) -> list[Append]:
        """Decisions for the dirty jobs that have no append in flight, and what the
        workflows that moved need (a step's job carries its workflow's trace)."""
        dirty, self.fleet.dirty = self.fleet.dirty, set()
        out = []
        for job_id in dirty - self._inflight:
            append = self.fleet.decide(job_id, now, random.random())
            if append is not None:
                out.append(append)
        for append in self.fleet.decide_workflows(now):
            workflow_id = append.event.get("workflow")
            if workflow_id and append.event.id not in self.trace:
                self.trace[append.event.id] = dict(self.trace.get(str(workflow_id)) or {})
            out.append(append)
        return out

    async def append_decision(self, append: Append) -> None:
        """Record one decision made outside the pump (a control request); its seq."""
        await self._execute([append], raise_conflict=True)
        self.wake()

    async def _execute(self, appends: list[Append], raise_conflict: bool = False) -> None:
        ids = {a.event.id for a in appends}
        self._inflight |= ids
        try:
            with self.spans.decisions(self.trace) as traced:
                pendings = [await self.log.send(a.event, expected_seq=a.expected_seq,
                                                msg_id=a.msg_id, headers=traced.headers(a))
                            for a in appends]
                results = await self.log.settle_all(pendings)
                traced.settled(appends, results)
        finally:
            self._inflight -= ids
        for append, result in zip(appends, results, strict=True):
            self._after_append(append, result, raise_conflict)

    def _after_append(self, append: Append, result: Ack | Exception,
                      raise_conflict: bool) -> None:
        if isinstance(result, Ack):
            if not result.duplicate:
                self._observe(replace(append.event, seq=result.seq), own=True)
            return
        if append.event.kind == "job":
            self.fleet.dirty.add(append.event.id)  # look again at what moved
        elif append.event.kind == "wf":
            self.fleet.workflows.dirty.add(append.event.id)
        if isinstance(result, Conflict):
            if raise_conflict:
                raise result
            return
        log.warning("append %s %s failed: %s", append.event.id, append.event.type, result)

    async def _dispatch(self, dispatches: list[Dispatch]) -> None:
        """Offer jobs to workers: one core NATS message per worker, a JSON list of its
        offers. Offers are derived data, not stored: the claim (``started`` with the
        offer's expected sequence) keeps runs exclusive, so a duplicate offer is
        harmless, and one that is lost (a worker's connection cut) is made again once the
        worker's heartbeats show it does not hold it, or after the dispatch timeout."""
        by_worker: dict[str, list[bytes]] = {}
        for d in dispatches:
            by_worker.setdefault(d.worker_id, []).append(_offer(d, self._work_headers(d)))
        self._send_offers(by_worker)

    def _send_offers(self, by_worker: dict[str, list[bytes]]) -> None:
        for worker_id, offers in by_worker.items():
            try:
                self.nc.publish_now(S.work_subject(worker_id),
                                    b"[" + b",".join(offers) + b"]")
            except Exception as exc:  # noqa: BLE001 - lost offers are made again (above)
                log.warning("offers to %s not sent: %s", worker_id, exc)

    def _work_headers(self, d: Dispatch) -> dict[str, str]:
        msg_id = f"work:{d.job.job_id}:{d.job.attempt + 1}:{d.worker_id}:{d.seq}"
        headers = self.spans.dispatched(d, dict(self.trace.get(d.job.job_id) or {}), msg_id)
        headers[S.HDR_MSG_ID] = msg_id
        return headers

    # -- intake ---------------------------------------------------------------------------
    async def _intake_loop(self) -> None:
        reader = QueueReader(self.nc, S.SUBMIT_STREAM, submit_consumer(), batch=self.batch)
        try:
            async for msgs in reader.deliveries():
                if msgs:
                    await self._take(reader, msgs)
                    # offer what was just queued: a burst of submissions does not keep
                    # the workers waiting for the intake to pause
                    await self._dispatch(self.fleet.dispatch(time.time()))
        finally:
            await reader.close()

    async def _take(self, reader: QueueReader, msgs: list[Delivery]) -> None:
        raws = [RawSubmission(subject.decode(), data, headers_of(headers),
                              ack_numbers(reply)[0]) for reply, subject, data, headers in msgs]
        with self.spans.submissions(raws) as traced:
            decisions = await self._decide(traced.raws)
            recorded = await self._record(decisions)
            traced.finish(decisions, recorded)
        await reader.ack([m for m, ok in zip(msgs, recorded, strict=True) if ok])
        for msg, ok in zip(msgs, recorded, strict=True):
            if not ok:  # redelivered in a second; recording it is idempotent
                await reader.nak(msg, delay_s=1.0)
        self.wake()

    async def _decide(self, raws: list[RawSubmission]) -> list[Decision]:
        decisions = [self._decide_one(r) for r in raws]
        if any(d.append.event.get("code") in ("unknown_handler", "unknown_workflow",
                                              "not_a_plugin", "no_active_version",
                                              "unknown_version") for d in decisions):
            await self._wait_for_log_head()  # a worker or a template came a moment ago
            decisions = [self._decide_one(r) for r in raws]
        for d in decisions:  # a workflow's template, loaded before it is started
            if d.accepted and d.append.event.kind == "wf":
                await self._load_template(str(d.append.event.data["template"]),
                                          int(d.append.event.data["version"]))
        return decisions

    def _decide_one(self, raw: RawSubmission) -> Decision:
        return self.intake.decide(raw, self.fleet.known_handlers, time.time(),
                                  self.fleet.template_digests, self.fleet.plugins)

    async def _load_template(self, name: str, version: int) -> None:
        """The template in the fleet's cache before a ``started`` naming it is observed
        (a template no store has leaves the workflow to fail, saying so)."""
        key = (name, version)
        if key in self.fleet.workflows.templates:
            return
        try:
            self.fleet.workflows.templates[key] = await self.templates.get(name, version)
        except (TemplateError, BusError, *TIMEOUTS) as exc:
            log.warning("workflow template %s v%d unavailable: %s", name, version, exc)

    async def _load_templates_of(self, msgs: list[Stored]) -> None:
        for msg in msgs:
            if msg.subject.startswith(_WF_PREFIX) and msg.subject.endswith(".started"):
                with contextlib.suppress(CodecError, KeyError, ValueError):
                    event = decode_event(msg.subject, msg.data, msg.seq)
                    await self._load_template(str(event.data["template"]),
                                              int(event.data["version"]))

    async def _record(self, decisions: list[Decision]) -> list[bool]:
        now = time.time()
        pendings, early = [], []
        for d in decisions:
            if d.accepted:
                self.trace[d.append.event.id] = d.headers
            job = self._early_job(d)
            worker_id = self.fleet.reserve_early(job, now) if job is not None else None
            pending = await self.log.send(
                d.append.event, expected_seq=0, msg_id=d.append.msg_id, headers=d.headers,
                via=S.work_ack_prefix(worker_id, self.sid) if worker_id else None)
            pendings.append(pending)
            if job is not None and worker_id is not None:
                early.append((Dispatch(job, worker_id, 0), pending.reply))
        if early:
            self._offer_early(early)
        results = await self.log.settle_all(pendings)
        return [await self._recorded(d, r) for d, r in zip(decisions, results, strict=True)]

    @staticmethod
    def _early_job(d: Decision) -> JobState | None:
        """The job a new submission makes, if it may be offered with its append."""
        event = d.append.event
        if not d.accepted or event.kind != "job" or event.type != "submitted":
            return None
        try:
            return apply(JobState(event.id), event)
        except IllegalTransition:
            return None

    def _offer_early(self, early: list[tuple[Dispatch, str]]) -> None:
        """Offer new jobs to idle workers while their ``submitted`` is being appended: an
        offer names the subject the append's ack comes on (the worker listens there too)
        instead of the sequence, which that ack says. This saves the trip through this
        sentinel between the append and the offer (about 0.5 ms of an idle system's
        submit -> succeeded); the claim stays exclusive by the same expected sequence."""
        by_worker: dict[str, list[bytes]] = {}
        for d, reply in early:
            by_worker.setdefault(d.worker_id, []).append(
                _offer(d, self._work_headers(d), ack=reply))
        self._send_offers(by_worker)

    async def _recorded(self, d: Decision, result: Ack | Exception) -> bool:
        """Whether the submission is now in the log (else it is redelivered)."""
        event = d.append.event
        if isinstance(result, Exception) or result.duplicate:
            self.fleet.cancel_early(event.id)  # its worker drops the offer on the same ack
        if isinstance(result, Conflict):
            return await self._on_existing(d)
        if isinstance(result, Exception):
            log.warning("recording submission %s failed: %s", event.id, result)
            return False
        self._observe(replace(event, seq=result.seq), duplicate=result.duplicate,
                      own=True)
        return True

    async def _on_existing(self, d: Decision) -> bool:
        """The job id has events already: a duplicate submission, or a rejection whose
        submitter picked an id that is taken (recorded under the derived id instead)."""
        event = d.append.event
        if d.accepted and event.kind == "wf":
            self._answer(event, duplicate=True)
            return True
        if d.accepted:
            asyncio.ensure_future(self._answer_duplicate(event))
            return True
        if event.id == d.derived_id:
            return True  # this very rejection was recorded before a redelivery
        moved = replace(event, id=d.derived_id)
        try:
            ack = await self.log.append(moved, expected_seq=0, msg_id=f"{moved.id}:rejected")
        except Conflict:
            return True
        self._observe(replace(moved, seq=ack.seq), own=True)
        return True

    async def _wait_for_log_head(self, timeout_s: float = 2.0) -> None:
        head = (await self.js.stream_info(S.EVENTS_STREAM)).state.last_seq
        deadline = time.monotonic() + timeout_s
        while self.fleet.tail_seq < head and time.monotonic() < deadline:  # read, in order
            await asyncio.sleep(0.01)

    # -- replies to `nats req` ------------------------------------------------------------
    def _on_request(self, subject: bytes, reply: bytes, data: bytes,
                    headers: bytes | None) -> None:
        """The core copy of a submission (raw: in the reading task). A plain publish is
        left to the stream's copy; a request's inbox is remembered for the answer."""
        if not reply:
            return
        msg = _Request(subject.decode(), reply.decode(), data, headers_of(headers))
        problem = header_problem(msg.headers)
        if problem:  # JF_SUBMIT may not store it: say so now (a stored copy is rejected)
            self._say(msg.reply, dumps({"error": problem, "code": "bad_header"}))
            return
        msg_id = msg.headers.get(S.HDR_MSG_ID)
        fingerprint = submission_fingerprint(msg.subject, msg_id, msg.data)
        body = self.replies.expect(fingerprint, msg.reply)
        if body is not None:
            self._say(msg.reply, body)
        elif msg_id:  # looked at again in a second (see _answer_if_deduplicated)
            self._unanswered.append((time.monotonic() + 1.0, fingerprint, msg))

    async def _look_at_unanswered(self) -> None:
        now = time.monotonic()
        while self._unanswered and self._unanswered[0][0] <= now:
            _due, fingerprint, msg = self._unanswered.popleft()
            if self.replies.is_waiting(fingerprint, msg.reply):
                asyncio.ensure_future(self._answer_if_deduplicated(fingerprint, msg))

    async def _answer_if_deduplicated(self, fingerprint: str, msg: _Request) -> None:
        """A repeat of a Nats-Msg-Id inside JF_SUBMIT's dedup window never reaches the
        stream, so no event will answer it: if the job it names exists, say so."""
        job_id = Intake.job_id_of(msg.data, msg.headers.get(S.HDR_MSG_ID))
        if not await self._job_exists(job_id):
            return
        raw = RawSubmission(msg.subject, msg.data, msg.headers, 0)
        decision = self.intake.decide(raw, self.fleet.known_handlers, time.time())
        new = decision.append.event.data if decision.accepted else None
        body = ReplyBook.body_for(Event("job", job_id, "submitted", 0.0, {}), duplicate=True,
                                  differs=await self._differs(job_id, new))
        if self.replies.withdraw(fingerprint, msg.reply):
            await self.nc.publish(msg.reply, body)

    async def _job_exists(self, job_id: str) -> bool:
        try:
            return await last_job_event(self.nc, job_id) is not None
        except TIMEOUTS:
            return False

    async def _answer_duplicate(self, event: Event) -> None:
        """Answer a submission of a job id that exists, saying where it differs."""
        differs = await self._differs(event.id, event.data)
        fingerprint = event.get("fp")
        if fingerprint:
            body = ReplyBook.body_for(event, duplicate=True, differs=differs)
            for inbox in self.replies.answer(fingerprint, body,
                                             everyone=bool(event.get("msg_id"))):
                await self.nc.publish(inbox, body)
        if differs:
            log.warning("job %s submitted again with other %s: the job keeps its first "
                        "submission", event.id, ", ".join(differs))

    async def _differs(self, job_id: str, new: dict[str, object] | None) -> list[str]:
        """The fields in which ``new`` (a submission's ``submitted`` data) is not what the
        job was submitted with; [] when they agree or the first one cannot be read."""
        if new is None:
            return []
        try:
            found = await job_event_of_type(self.nc, job_id, "submitted")
            first = decode_event(found[1], found[2], found[0]) if found else None
        except (*TIMEOUTS, BusError, CodecError):
            return []
        return differing_fields(first.data, new) if first is not None else []

    async def _on_control(self, msg: Msg) -> None:
        key = "workflow_id" if msg.subject == S.CONTROL_WF_CANCEL else "job_id"
        try:
            body = loads(msg.data)
            job_id = S.check_job_id(body.get(key) if isinstance(body, dict) else None)
        except (CodecError, S.InvalidToken) as exc:
            answer: dict[str, object] = {"error": f"{exc}; send {{\"{key}\": \"...\"}}"}
        else:
            if key == "workflow_id":
                answer = await self.control.cancel_workflow(job_id, body)
                if msg.reply:
                    await self.nc.publish(msg.reply, dumps(answer))
                return
            act = self.control.cancel if msg.subject == S.CONTROL_CANCEL else self.control.retry
            answer = await act(job_id, body)
        if msg.reply:
            await self.nc.publish(msg.reply, dumps(answer))

    async def _on_ping(self, msg: Msg) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, dumps({
                "last_seq": self.fleet.last_seq, "active_jobs": len(self.fleet.jobs),
                "workers": sorted(w for w, i in self.fleet.workers.items()
                                  if i.status == "live"),
                "handlers": sorted(self.fleet.live_handlers()),
                "workflows": len(self.fleet.workflows.runs)}))

    def _answer(self, event: Event, duplicate: bool = False) -> None:
        fingerprint = event.get("fp")
        if not fingerprint:
            return
        body = ReplyBook.body_for(event, duplicate)
        everyone = bool(event.get("msg_id"))
        for inbox in self.replies.answer(fingerprint, body, everyone=everyone,
                                         seq=event.seq or None,
                                         keep=everyone or self._taking_requests):
            self._say(inbox, body)

    def _say(self, inbox: str, body: bytes) -> None:
        """Answer a request now; one that cannot be sent (the connection away with its
        buffer full, closing) is dropped: its submitter asks again (the answer comes from
        the log), and the loop that observed the event goes on."""
        try:
            self.nc.publish_now(inbox, body)
        except Exception as exc:  # noqa: BLE001 - an answer is not worth a loop
            log.debug("answer to %s not sent: %s", inbox, exc)

    # -- time and heartbeats ----------------------------------------------------------------
    async def _tick_loop(self) -> None:
        last_reconcile = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            if time.monotonic() - last_reconcile > self.reconcile_s:
                self.fleet.reconcile()
                last_reconcile = time.monotonic()
            await self._look_at_unanswered()
            fired, lost = self.fleet.due(time.time())
            self.fleet.dirty |= fired
            if lost:
                await self._execute(lost)
            if self.fleet.dirty or self.fleet.workflows.dirty or self.fleet.sched.ready_count():
                self.wake()

    async def _hb_loop(self) -> None:
        beats = Tail(self.js, S.HEARTBEAT_STREAM, batch=256)
        async for batch in beats.batches():
            now = time.time()
            for msg in batch:
                worker_id = msg.subject.rsplit(".", 1)[-1]
                try:
                    beat = loads(msg.data)
                    running = frozenset(beat["running"])
                    held = frozenset(beat.get("held") or ())
                    beat_at = float(beat["at"])
                    draining = beat.get("draining") is True
                except Exception:  # noqa: BLE001 - a forged heartbeat still shows life
                    self.fleet.heartbeat(worker_id, now)
                    continue
                self.fleet.heartbeat(worker_id, now, beat_at, running, held=held,
                                     draining=draining)


_WF_PREFIX = f"{S.PREFIX}.wf."


class _Request(NamedTuple):
    """A submission request as the core subscription saw it."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str]


def _offer(d: Dispatch, headers: dict[str, str], ack: str | None = None) -> bytes:
    """One offer: what the worker needs to claim and run the attempt, and the headers
    (trace context, correlation id) its events carry. An early one (``ack``) has no
    ``seq`` yet: the ack on that subject says it."""
    job = d.job
    plugin = ({"plugin": job.plugin, "input": job.input, "output": job.output}
              if job.plugin else {})
    early = {"ack": ack} if ack else {}
    return dumps({"job_id": job.job_id, "attempt": job.attempt + 1,
                  "seq": None if ack else d.seq, **early,
                  "queue": job.queue, "handler": job.handler, "args": job.args,
                  "priority": job.priority, "timeout_s": job.timeout_s,
                  "correlation_id": job.correlation_id, "headers": headers, **plugin})
