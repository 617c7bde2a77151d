"""What a workflow looks like from its events: its state, result and every step's state,
attempts, result, error, job id and times. Pure; the client, ``jetflow workflow show``
and ``--wait`` read it. It folds with the same engine the sentinel decides with
(:class:`~jetflow.core.workflow.Workflows`), so what it shows is what the sentinel knows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jetflow.core.events import Event
from jetflow.core.template import Template
from jetflow.core.workflow import WF_TERMINAL, WorkflowRun, Workflows, workflow_result

__all__ = ["WorkflowView", "StepView", "fold_workflow", "template_of"]


@dataclass
class StepView:
    name: str
    job_id: str
    type: str
    handler: str
    depends_on: tuple[str, ...]
    state: str = "pending"
    attempts: int = 0
    result: Any = None
    error: Any = None
    started_at: float | None = None
    finished_at: float | None = None
    instance_of: str | None = None

    def duration_s(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        return round((self.finished_at or now) - self.started_at, 6)

    def as_json(self, now: float) -> dict[str, Any]:
        return {"state": self.state, "attempts": self.attempts, "result": self.result,
                "error": self.error, "job_id": self.job_id, "type": self.type,
                "handler": self.handler, "depends_on": list(self.depends_on),
                "instance_of": self.instance_of, "started_at": self.started_at,
                "finished_at": self.finished_at, "duration_s": self.duration_s(now)}


@dataclass
class WorkflowView:
    workflow_id: str
    name: str = ""
    version: int = 0
    state: str = "unknown"  # running, succeeded, failed, cancelled (unknown: no events)
    result: Any = None
    context: Any = None
    queue: str = ""
    reason: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    steps: dict[str, StepView] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state in WF_TERMINAL

    def as_json(self, now: float) -> dict[str, Any]:
        end = self.finished_at or now
        return {"workflow_id": self.workflow_id, "name": self.name, "version": self.version,
                "state": self.state, "result": self.result, "reason": self.reason or None,
                "context": self.context, "queue": self.queue, "started_at": self.started_at,
                "finished_at": self.finished_at,
                "duration_s": None if self.started_at is None
                else round(end - self.started_at, 6),
                "steps": {name: s.as_json(now) for name, s in self.steps.items()}}


def template_of(events: Iterable[Event]) -> tuple[str, int] | None:
    """(name, version) of the template a workflow's ``started`` names."""
    for e in events:
        if e.kind == "wf" and e.type == "started":
            return str(e.data["template"]), int(e.data["version"])
    return None


def fold_workflow(workflow_id: str, template: Template | None,
                  events: Iterable[Event]) -> WorkflowView:
    """The workflow from its own events and its steps' job events (any order: folded by
    sequence). ``template`` is the one its ``started`` names (None: not available)."""
    view = WorkflowView(workflow_id)
    engine = Workflows()
    run: WorkflowRun | None = None
    times: dict[str, tuple[float | None, float | None]] = {}
    for e in sorted(events, key=lambda e: e.seq):
        if e.kind == "wf" and e.id == workflow_id:
            _wf_event(view, engine, template, e)
            run = run or engine.runs.get(workflow_id)
        elif e.kind == "job":
            engine.observe_job(e)
            first, last = times.get(e.id, (None, None))
            if e.type == "started" and first is None:
                first = e.at
            if e.type in ("succeeded", "dead_lettered", "cancelled", "skipped", "rejected"):
                last = e.at
            times[e.id] = (first, last)
    if run is not None:
        _steps(view, run, times)
        if not view.finished:
            view.result = workflow_result(run)
    return view


def _wf_event(view: WorkflowView, engine: Workflows, template: Template | None,
              e: Event) -> None:
    if e.type == "started":
        view.name, view.version = str(e.data["template"]), int(e.data["version"])
        view.context, view.queue = e.data.get("context"), str(e.data.get("queue") or "")
        view.state, view.started_at = "running", e.at
        if template is not None:
            engine.templates[(view.name, view.version)] = template
        else:
            view.reason = f"template {view.name} v{view.version} is not available"
    elif e.type in WF_TERMINAL:
        view.state, view.finished_at = e.type, e.at
        view.result = e.data.get("result")
        view.reason = str(e.data.get("reason") or "")
    engine.observe_wf(e)


def _steps(view: WorkflowView, run: WorkflowRun,
           times: dict[str, tuple[float | None, float | None]]) -> None:
    for name, step in run.steps.items():
        started, finished = times.get(step.job_id, (None, None))
        view.steps[name] = StepView(
            name, step.job_id, step.spec.type, step.spec.handler,
            (step.instance_of,) if step.instance_of else step.spec.depends_on,
            step.state, step.attempts, step.result, step.error, started,
            finished if step.ended else None, step.instance_of)
        if step.instances is not None and step.ended and view.steps[name].started_at is None:
            firsts = [times.get(run.steps[i].job_id, (None, None)) for i in step.instances]
            view.steps[name].started_at = min((f for f, _ in firsts if f), default=None)
            view.steps[name].finished_at = max((f for _, f in firsts if f), default=None)
