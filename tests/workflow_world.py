"""A whole jetflow in one process, without a server: the sentinel's model (a Fleet, with
its workflows) fed an event log the way JF_EVENTS would (increasing sequences, appends
stored only when they expect the entity's last sequence), and workers that run the
example handlers in-process. For the pure core's workflow tests: every example, exact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from jetflow.core import subjects as S
from jetflow.core.codec import decode_event, encode_event
from jetflow.core.events import Event
from jetflow.core.fleet import Append, Fleet
from jetflow.core.retry import RetryPolicy
from jetflow.core.template import Template, canonical, digest, parse_template
from jetflow.core.workflow import WF_TERMINAL, step_job_id
from jetflow.examples.workflows.handlers import HANDLERS
from jetflow.workers.context import JobContext, PermanentError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "workflows"


def example(name: str) -> Template:
    return parse_template(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()))


class WorkflowWorld:
    def __init__(self, handlers: dict[str, Any] | None = None) -> None:
        self.fleet = Fleet(policy=RetryPolicy(base_s=0.1, factor=2.0, cap_s=1.0, jitter=0.0))
        self.seq = 0
        self.last: dict[tuple[str, str], int] = {}
        self.log: list[Event] = []
        self.now = 1000.0
        self.handlers = {**HANDLERS, **(handlers or {})}
        self.worker_calls: dict[str, int] = {}
        self.store(Event("worker", "w", "joined", self.now, {
            "handlers": sorted(self.handlers), "queues": ["default"], "concurrency": 1000,
            "heartbeat_s": 1e6}))

    # -- the log ----------------------------------------------------------------------------
    def store(self, event: Event) -> Event:
        self.seq += 1
        stored = decode_event(S.event_subject(event.kind, event.id, event.type),
                              encode_event(replace(event, seq=self.seq)), self.seq)
        self.last[(event.kind, event.id)] = self.seq
        self.log.append(stored)
        self.fleet.observe(stored)
        return stored

    def commit(self, append: Append) -> bool:
        """Store it if it expects what is there (as the server does); else refuse."""
        key = (append.event.kind, append.event.id)
        if append.expected_seq != self.last.get(key, 0):
            return False
        self.store(append.event)
        return True

    # -- templates and workflows ---------------------------------------------------------------
    def register(self, template: Template, version: int = 1) -> None:
        self.fleet.workflows.templates[(template.name, version)] = template
        self.fleet.template_digests.setdefault(template.name, {})[version] = \
            digest(canonical(template))

    def start(self, template: Template, context: Any, workflow_id: str = "w1") -> str:
        self.register(template)
        self.store(Event("wf", workflow_id, "started", self.now, {
            "template": template.name, "version": 1, "sha256": "x", "context": context,
            "queue": "default"}))
        return workflow_id

    def run(self, workflow_id: str, max_rounds: int = 10_000) -> Event:
        """Decide, run the queued steps, advance the clock; until the workflow ends."""
        for _ in range(max_rounds):
            end = self.terminal(workflow_id)
            if end is not None:
                return end
            self.round()
        raise AssertionError(f"workflow {workflow_id} did not end: {self.summary()}")

    def round(self) -> None:
        for append in self.fleet.decide_workflows(self.now):
            self.commit(append)
        for job_id in sorted(self.fleet.dirty):
            self.fleet.dirty.discard(job_id)
            append = self.fleet.decide(job_id, self.now, 0.5)
            if append is not None:
                self.commit(append)
        queued = [j for j in self.fleet.jobs.values() if j.state == "queued"]
        for job in sorted(queued, key=lambda j: j.job_id):
            self.execute(job.job_id)
        self.now += 0.05
        ready, _lost = self.fleet.due(self.now)
        self.fleet.dirty |= ready

    def execute(self, job_id: str) -> None:
        job = self.fleet.jobs[job_id]
        attempt = job.attempt + 1
        self.store(Event("job", job_id, "started", self.now,
                         {"attempt": attempt, "worker": "w", "lease_s": 15.0}))
        self.worker_calls[job_id] = self.worker_calls.get(job_id, 0) + 1
        ctx = JobContext(job_id, attempt, job.correlation_id, job.queue)
        try:
            result = self.handlers[job.handler](job.args, ctx)
        except PermanentError as exc:
            self._failed(job_id, attempt, exc, retryable=False)
        except Exception as exc:  # noqa: BLE001 - a handler's failure
            self._failed(job_id, attempt, exc, retryable=True)
        else:
            self.store(Event("job", job_id, "succeeded", self.now,
                             {"attempt": attempt, "worker": "w", "result": result}))

    def _failed(self, job_id: str, attempt: int, exc: Exception, *, retryable: bool) -> None:
        self.store(Event("job", job_id, "failed", self.now, {
            "attempt": attempt, "error_type": type(exc).__name__, "message": str(exc),
            "retryable": retryable, "worker": "w"}))

    # -- reading it back ------------------------------------------------------------------------
    def terminal(self, workflow_id: str) -> Event | None:
        return next((e for e in reversed(self.log) if e.kind == "wf" and e.id == workflow_id
                     and e.type in WF_TERMINAL), None)

    def step_events(self, workflow_id: str, step: str) -> list[Event]:
        job_id = step_job_id(workflow_id, step)
        return [e for e in self.log if e.kind == "job" and e.id == job_id]

    def step_state(self, workflow_id: str, step: str) -> str:
        events = self.step_events(workflow_id, step)
        if not events:
            return "pending"
        last = events[-1].type
        return {"dead_lettered": "failed"}.get(last, last)

    def summary(self) -> str:
        return ", ".join(f"{e.kind}:{e.id}:{e.type}" for e in self.log[-20:])
