"""Running workflows: the DAG planning, from the events of the log to what to record next.
Pure, like :mod:`jetflow.core.fleet` (which holds an instance of :class:`Workflows`).

A workflow is started by one ``jf.wf.<id>.started`` event naming its template (name,
version, digest) and context: its whole plan, atomically. Each step runs as a job whose id
is derived from the workflow's and the step's (:func:`step_job_id`); its ``submitted`` (or,
for a step that will not run, ``skipped``) event carries ``workflow`` and ``step``. The
workflow learns of its steps from their job events: an outcome updates only the step's
children (the sentinel's work per event stays O(1)); a child whose parents have all ended
joins the *frontier*, and :meth:`Workflows.decide` says what to append for it: its job (with
``{"context", "parents", "args"}`` as arguments), its skip, and once every step has ended
the workflow's own ``succeeded``/``failed``/``cancelled``. Everything it decides is an
append with an expected sequence, so a repeat (a restart, two sentinels) records nothing
twice.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jetflow.core.events import Event
from jetflow.core.template import StepSpec, Template

__all__ = ["Workflows", "WorkflowRun", "StepRun", "step_job_id", "instance_name",
           "WF_TERMINAL", "Emit", "batch_cursors", "decision_branches"]

WF_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ENDED = frozenset({"succeeded", "failed", "skipped", "cancelled"})
ASK_AGAIN_S = 5.0  # an append decided but not seen in the log is decided again after this


def step_job_id(workflow_id: str, step: str) -> str:
    """The job id of a step of a workflow: deterministic, short, always a valid job id."""
    digest = hashlib.blake2b(f"{workflow_id}/{step}".encode(), digest_size=10).digest()
    return "s" + base64.b32encode(digest).decode().lower()


def instance_name(worker: str, i: int) -> str:
    return f"{worker}_{i:03d}"


def decision_branches(spec: StepSpec, children: tuple[str, ...], result: Any
                      ) -> tuple[list[str] | None, str]:
    """The branches a decision step's result chose, or (None, why it is no choice)."""
    branches = result.get("branches") if isinstance(result, Mapping) else None
    if not isinstance(branches, list) or not all(isinstance(b, str) for b in branches):
        return None, (f"decision step {spec.name!r} must return {{\"branches\": [step names]}}, "
                      f"got {str(result)[:200]}")
    strangers = sorted(set(branches) - set(children))
    if strangers:
        return None, (f"decision step {spec.name!r} chose {strangers}, which are not its "
                      f"children ({', '.join(children)})")
    return list(dict.fromkeys(branches)), ""


def batch_cursors(spec: StepSpec, result: Any) -> tuple[list[Any] | None, str]:
    batches = result.get("batches") if isinstance(result, Mapping) else None
    if not isinstance(batches, list):
        return None, (f"batch step {spec.name!r} must return {{\"batches\": [cursors]}}, "
                      f"got {str(result)[:200]}")
    if len(batches) > 1000:
        return None, f"batch step {spec.name!r} returned {len(batches)} batches, over 1000"
    return batches, ""


@dataclass
class StepRun:
    name: str
    job_id: str
    spec: StepSpec
    state: str = "pending"  # pending, queued (its job exists), succeeded, failed, skipped...
    result: Any = None
    error: Any = None
    attempts: int = 0
    waiting: int = 0  # parents not ended yet
    outcomes: dict[str, str] = field(default_factory=dict)  # parent -> how it counts
    batch: Any = None  # a batch worker instance's cursor
    instance_of: str | None = None  # the batch_worker step an instance is one of
    instances: list[str] | None = None  # a batch_worker step's
    unfinished: int = 0  # a batch_worker step's instances that have not ended yet
    invalid: str = ""  # a decision/batch result that is no valid one (failed, once recorded)

    @property
    def ended(self) -> bool:
        return self.state in ENDED


@dataclass
class WorkflowRun:
    workflow_id: str
    template: Template
    version: int
    context: Any
    queue: str
    started_at: float
    last_seq: int = 0
    state: str = "running"
    cancel_requested: bool = False
    stopping: str = ""  # why every pending and running step is being stopped
    steps: dict[str, StepRun] = field(default_factory=dict)
    frontier: dict[str, None] = field(default_factory=dict)  # ready to be decided, in order
    ended: int = 0  # template steps that ended
    result: Any = None
    asked: dict[str, float] = field(default_factory=dict)  # entity -> when decided
    invalid: dict[str, None] = field(default_factory=dict)  # steps whose result is no valid one

    @property
    def finished(self) -> bool:
        return self.state in WF_TERMINAL


Emit = Callable[[Event, int, str], None]  # (event, expected seq, msg id)


class Workflows:
    """Every running workflow, from the log; what to append next for each."""

    def __init__(self) -> None:
        self.runs: dict[str, WorkflowRun] = {}
        self.by_job: dict[str, tuple[str, str]] = {}  # job id -> (workflow id, step)
        self.templates: dict[tuple[str, int], Template] = {}
        # workflow id -> (why its template is unavailable, the seq of its `started`)
        self.missing: dict[str, tuple[str, int]] = {}
        self.dirty: set[str] = set()

    # -- observing --------------------------------------------------------------------
    def observe_wf(self, event: Event) -> None:
        run = self.runs.get(event.id)
        if event.type == "started":
            if run is None:
                self._start(event)
            return
        if run is None:
            if event.type in WF_TERMINAL:
                self.missing.pop(event.id, None)
            return
        run.last_seq = max(run.last_seq, event.seq)
        if event.type == "step_failed":
            self._step_failed(run, str(event.data.get("step")), event.data.get("error"))
        elif event.type == "cancel_requested":
            run.cancel_requested = True
            self._stop(run, str(event.data.get("reason") or "workflow cancelled"))
        elif event.type in WF_TERMINAL:
            run.state, run.result = event.type, event.data.get("result")
            self._forget(run)
        self.dirty.add(run.workflow_id)

    def _start(self, event: Event) -> None:
        name, version = str(event.data["template"]), int(event.data["version"])
        template = self.templates.get((name, version))
        if template is None:
            self.missing[event.id] = (f"template {name} v{version} is not available", event.seq)
            self.dirty.add(event.id)
            return
        run = WorkflowRun(event.id, template, version, event.data.get("context"),
                          str(event.data.get("queue") or template.queue or "default"),
                          event.at, event.seq)
        for spec in template.steps:
            step = StepRun(spec.name, step_job_id(event.id, spec.name), spec,
                           waiting=len(spec.depends_on))
            run.steps[spec.name] = step
            self.by_job[step.job_id] = (event.id, spec.name)
            if not spec.depends_on:
                run.frontier[spec.name] = None
        self.runs[event.id] = run
        self.dirty.add(event.id)

    def observe_job(self, event: Event) -> bool:
        """A job event; True if it was one of a running workflow's steps."""
        where = self.by_job.get(event.id)
        if where is None:
            return False
        run = self.runs.get(where[0])
        step = run.steps.get(where[1]) if run is not None else None
        if run is None or step is None:
            return False
        run.asked.pop(step.job_id, None)
        self._step_event(run, step, event)
        self.dirty.add(run.workflow_id)
        return True

    def _step_event(self, run: WorkflowRun, step: StepRun, event: Event) -> None:
        type_ = event.type
        if type_ in ("submitted", "queued") and step.state == "pending":
            step.state = "queued"
            run.frontier.pop(step.name, None)
        elif type_ == "started":
            step.state, step.attempts = "running", int(event.data.get("attempt", 0))
        elif type_ in ("failed", "timed_out", "retry_scheduled"):
            step.state = "queued" if type_ == "retry_scheduled" else "running"
        elif type_ == "succeeded":
            self._succeeded(run, step, event.data.get("result"))
        elif type_ == "dead_lettered":
            self._end(run, step, "failed", error=event.data.get("last_error")
                      or {"message": event.data.get("reason")})
        elif type_ == "cancelled":
            self._end(run, step, "cancelled", error={"message": event.data.get("reason")})
        elif type_ == "skipped":
            run.frontier.pop(step.name, None)
            self._end(run, step, "skipped", error={"message": event.data.get("reason")})

    def _succeeded(self, run: WorkflowRun, step: StepRun, result: Any) -> None:
        spec = step.spec
        if spec.type == "decision":
            branches, why = decision_branches(spec, run.template.children[spec.name], result)
            if branches is None:
                step.invalid, step.result = why, result  # failed once `step_failed` is in
                run.invalid[step.name] = None
                return
        if spec.type == "batch":
            cursors, why = batch_cursors(spec, result)
            if cursors is None:
                step.invalid, step.result = why, result
                run.invalid[step.name] = None
                return
        self._end(run, step, "succeeded", result=result)

    def _step_failed(self, run: WorkflowRun, name: str, error: Any) -> None:
        step = run.steps.get(name)
        if step is not None and not step.ended:
            self._end(run, step, "failed", error=error, result=step.result)

    # -- a step ends: its children learn of it -------------------------------------------
    def _end(self, run: WorkflowRun, step: StepRun, state: str, *, result: Any = None,
             error: Any = None) -> None:
        if step.ended:
            return
        step.state, step.result, step.error = state, result, error
        run.invalid.pop(step.name, None)
        if step.instance_of is not None:
            self._instance_ended(run, step)
            return
        run.ended += 1
        if state == "succeeded" and step.spec.type == "batch":
            self._create_instances(run, step)
        if state == "failed" and run.template.fail_fast and not step.spec.continue_on_failure:
            self._stop(run, f"fail_fast: step {step.name} failed")
        for child in run.template.children[step.name]:
            self._parent_ended(run, run.steps[child], step)

    def _parent_ended(self, run: WorkflowRun, child: StepRun, parent: StepRun) -> None:
        if parent.name in child.outcomes:
            return
        child.outcomes[parent.name] = self._counts_as(run, parent, child)
        child.waiting -= 1
        if child.waiting == 0 and child.state == "pending":
            if child.spec.type == "batch_worker" and child.instances is not None:
                self._worker_ready(run, child)
            else:
                run.frontier[child.name] = None

    def _counts_as(self, run: WorkflowRun, parent: StepRun, child: StepRun) -> str:
        if parent.state == "succeeded":
            if parent.spec.type == "decision":
                chosen, _ = decision_branches(parent.spec, run.template.children[parent.name],
                                              parent.result)
                return "succeeded" if chosen and child.name in chosen else "not chosen"
            return "succeeded"
        if parent.state in ("failed", "cancelled") and parent.spec.continue_on_failure:
            return "succeeded"  # as if it succeeded, with a null result
        return "skipped" if parent.state == "skipped" else "failed"

    # -- batches ---------------------------------------------------------------------------
    def _create_instances(self, run: WorkflowRun, batch: StepRun) -> None:
        worker = run.steps[str(batch.spec.worker)]
        cursors, _ = batch_cursors(batch.spec, batch.result)
        worker.instances = []
        for i, cursor in enumerate(cursors or []):
            name = instance_name(worker.name, i)
            inst = StepRun(name, step_job_id(run.workflow_id, name), worker.spec, batch=cursor,
                           instance_of=worker.name)
            run.steps[name] = inst
            self.by_job[inst.job_id] = (run.workflow_id, name)
            worker.instances.append(name)
        worker.unfinished = len(worker.instances)

    def _worker_ready(self, run: WorkflowRun, worker: StepRun) -> None:
        """Its batch step ended: its instances may go (or, there being none, it ends)."""
        assert worker.instances is not None
        if worker.outcomes.get(worker.spec.depends_on[0]) != "succeeded":
            run.frontier[worker.name] = None  # skipped, decided as any step
            return
        worker.state = "queued"
        if not worker.instances:
            self._end(run, worker, "succeeded", result=[])
        for name in worker.instances:
            run.frontier[name] = None

    def _instance_ended(self, run: WorkflowRun, inst: StepRun) -> None:
        worker = run.steps[str(inst.instance_of)]
        assert worker.instances is not None
        worker.unfinished -= 1
        if worker.unfinished > 0:  # a count, not a scan: O(1) per instance that ends
            return
        instances = [run.steps[n] for n in worker.instances]
        failed = [i for i in instances if i.state in ("failed", "cancelled", "skipped")]
        if failed and not worker.spec.continue_on_failure:
            self._end(run, worker, "failed", result=[i.result for i in instances],
                      error={"message": f"{len(failed)} of {len(instances)} batches failed"})
        else:
            self._end(run, worker, "succeeded", result=[i.result for i in instances])

    # -- stopping everything ---------------------------------------------------------------
    def _stop(self, run: WorkflowRun, why: str) -> None:
        if not run.stopping:
            run.stopping = why
            for step in run.steps.values():
                if step.state == "pending" and step.waiting == 0:
                    run.frontier[step.name] = None
                elif not step.ended and step.state != "pending":
                    run.frontier[step.name] = None  # to cancel its job

    def _forget(self, run: WorkflowRun) -> None:
        for step in run.steps.values():
            self.by_job.pop(step.job_id, None)
        self.runs.pop(run.workflow_id, None)

    # -- deciding ---------------------------------------------------------------------------
    def decide(self, workflow_id: str, now: float, emit: Emit,
               job_seq: Callable[[str], int | None]) -> None:
        """Append what the workflow needs next: through ``emit`` (event, expected seq, msg
        id). ``job_seq`` gives the last sequence of a job the log has (to cancel it)."""
        if workflow_id in self.missing:
            self._fail_unavailable(workflow_id, now, emit)
            return
        run = self.runs.get(workflow_id)
        if run is None or run.finished:
            return
        for name in list(run.frontier):
            step = run.steps[name]
            if not self._asking(run, step.job_id, now):
                continue
            if step.ended or (step.state != "pending" and not run.stopping):
                run.frontier.pop(name, None)
                run.asked.pop(step.job_id, None)
            elif step.state == "pending":
                self._start_or_skip(run, step, now, emit)
            else:
                seq = job_seq(step.job_id)
                if seq is not None:
                    emit(Event("job", step.job_id, "cancel_requested", now,
                               {"reason": run.stopping}), seq,
                         f"{step.job_id}:cancel_requested:wf")
        self._record_invalid(run, now, emit)
        self._finish_if_done(run, now, emit)

    def _asking(self, run: WorkflowRun, entity: str, now: float) -> bool:
        """Whether to decide for ``entity`` now: not while an append for it is on its way
        (for :data:`ASK_AGAIN_S`)."""
        asked = run.asked.get(entity)
        if asked is not None and now - asked < ASK_AGAIN_S:
            return False
        run.asked[entity] = now
        return True

    def _start_or_skip(self, run: WorkflowRun, step: StepRun, now: float, emit: Emit) -> None:
        why = self._why_skip(run, step)
        tags = {"workflow": run.workflow_id, "step": step.name}
        if why:
            emit(Event("job", step.job_id, "skipped", now, {"reason": why, **tags}), 0,
                 f"{step.job_id}:skipped")
            return
        spec = step.spec
        args: dict[str, Any] = {"context": run.context, "parents": self._parents(run, step),
                                "args": spec.args}
        if step.instance_of is not None:
            args["batch"] = step.batch
        data: dict[str, Any] = {
            "queue": run.queue, "handler": spec.handler, "args": args, "priority": 0,
            "max_attempts": spec.max_attempts or 3, "timeout_s": spec.timeout_s,
            "correlation_id": run.workflow_id, "queued": True, **tags}
        if spec.retry:
            data["retry"] = spec.retry
        emit(Event("job", step.job_id, "submitted", now, data), 0, f"{step.job_id}:submitted")

    def _why_skip(self, run: WorkflowRun, step: StepRun) -> str:
        if run.stopping:
            return run.stopping
        outcomes = step.outcomes.values()
        if step.spec.type == "convergence":
            if "failed" in outcomes:
                return "a parent failed"
            return "" if "succeeded" in outcomes else "no parent ran"
        failed = [p for p, o in step.outcomes.items() if o == "failed"]
        if failed:
            return f"parent {failed[0]} failed"
        skipped = [p for p, o in step.outcomes.items() if o != "succeeded"]
        if skipped:
            o = step.outcomes[skipped[0]]
            return f"parent {skipped[0]} {'did not choose it' if o == 'not chosen' else o}"
        return ""

    def _parents(self, run: WorkflowRun, step: StepRun) -> dict[str, Any]:
        """The results of the parents that ran (a batch_worker's: the list of its
        instances' results; a failed parent that continues on failure: null)."""
        out: dict[str, Any] = {}
        for name in step.spec.depends_on:
            if step.outcomes.get(name) == "succeeded":
                parent = run.steps[name]
                out[name] = parent.result if parent.state == "succeeded" else None
        return out

    def _record_invalid(self, run: WorkflowRun, now: float, emit: Emit) -> None:
        for name in list(run.invalid):
            step = run.steps[name]
            if not step.ended and self._asking(run, f"invalid:{step.name}", now):
                emit(Event("wf", run.workflow_id, "step_failed", now,
                           {"step": step.name, "job_id": step.job_id,
                            "error": {"error_type": "InvalidResult", "message": step.invalid}}),
                     run.last_seq, f"wf:{run.workflow_id}:step_failed:{step.name}")

    def _finish_if_done(self, run: WorkflowRun, now: float, emit: Emit) -> None:
        if run.ended < len(run.template.steps) or not self._asking(run, "finish", now):
            return
        failed = [s.name for s in run.steps.values()
                  if s.state in ("failed", "cancelled") and s.name in run.template.by_name
                  and not s.spec.continue_on_failure]
        type_ = "cancelled" if run.cancel_requested else "failed" if failed else "succeeded"
        data: dict[str, Any] = {"result": workflow_result(run), "steps": len(run.steps)}
        if failed:
            data["failed_steps"] = failed
            data["reason"] = run.stopping or f"step {failed[0]} failed"
        emit(Event("wf", run.workflow_id, type_, now, data), run.last_seq,
             f"wf:{run.workflow_id}:{type_}")

    def _fail_unavailable(self, workflow_id: str, now: float, emit: Emit) -> None:
        why, seq = self.missing[workflow_id]
        emit(Event("wf", workflow_id, "failed", now, {"result": None, "reason": why}), seq,
             f"wf:{workflow_id}:failed")

    # -- for a sentinel that starts again ----------------------------------------------------
    def reconcile(self) -> None:
        self.dirty |= self.runs.keys() | self.missing.keys()

    def job_ids(self, workflow_id: str) -> Iterable[str]:
        run = self.runs.get(workflow_id)
        return [s.job_id for s in run.steps.values()] if run else []


def workflow_result(run: WorkflowRun) -> Any:
    """The result of the step(s) nothing depends on: one value for one such step, else an
    object by step name (of those that succeeded)."""
    sinks = run.template.sinks
    if len(sinks) == 1:
        only = run.steps[sinks[0]]
        return only.result if only.state == "succeeded" else None
    return {name: run.steps[name].result for name in sinks
            if run.steps[name].state == "succeeded"}
