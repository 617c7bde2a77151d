"""The running workflows as a JSON-able document and back (for the sentinel's snapshot,
:mod:`jetflow.core.snapshot`). Pure. The document carries the templates the runs use, in
their canonical form, so a restored sentinel needs nothing but the snapshot."""

from __future__ import annotations

from typing import Any

from jetflow.core.template import Template, canonical, parse_template
from jetflow.core.workflow import StepRun, WorkflowRun, Workflows

__all__ = ["workflows_doc", "restore_workflows"]

_STEP_FIELDS = ("name", "job_id", "state", "result", "error", "attempts", "waiting",
                "outcomes", "batch", "instance_of", "instances", "unfinished", "invalid")
_RUN_FIELDS = ("workflow_id", "version", "context", "queue", "started_at", "last_seq", "state",
               "cancel_requested", "stopping", "ended", "result")


def workflows_doc(wf: Workflows) -> dict[str, Any]:
    used = {(r.template.name, r.version) for r in wf.runs.values()}
    return {
        "templates": [{"name": n, "version": v, "doc": canonical(wf.templates[(n, v)])}
                      for n, v in sorted(used) if (n, v) in wf.templates],
        "runs": [_run_doc(r) for r in wf.runs.values()],
        "missing": {k: list(v) for k, v in wf.missing.items()},
    }


def _run_doc(run: WorkflowRun) -> dict[str, Any]:
    doc: dict[str, Any] = {f: getattr(run, f) for f in _RUN_FIELDS}
    doc["template"] = run.template.name
    doc["frontier"] = list(run.frontier)
    doc["invalid"] = list(run.invalid)
    # (copies of what changes in place: the snapshot is written while the fleet moves on)
    doc["steps"] = [{**{f: getattr(s, f) for f in _STEP_FIELDS}, "outcomes": dict(s.outcomes),
                     "instances": None if s.instances is None else list(s.instances),
                     "spec": s.spec.name}
                    for s in run.steps.values()]
    return doc


def restore_workflows(doc: dict[str, Any]) -> Workflows:
    """Workflows as the document says; every run marked to be decided again. KeyError,
    TypeError or ValueError (TemplateError) for a document that does not hold them."""
    wf = Workflows()
    for t in doc["templates"]:
        wf.templates[(str(t["name"]), int(t["version"]))] = parse_template(t["doc"])
    for run_doc in doc["runs"]:
        run = _run(run_doc, wf.templates[(str(run_doc["template"]), int(run_doc["version"]))])
        wf.runs[run.workflow_id] = run
        for step in run.steps.values():
            wf.by_job[step.job_id] = (run.workflow_id, step.name)
    wf.missing = {k: (str(v[0]), int(v[1])) for k, v in doc["missing"].items()}
    wf.reconcile()
    return wf


def _run(doc: dict[str, Any], template: Template) -> WorkflowRun:
    run = WorkflowRun(template=template, **{f: doc[f] for f in _RUN_FIELDS})
    run.frontier = dict.fromkeys(doc["frontier"])
    run.invalid = dict.fromkeys(doc["invalid"])
    for s in doc["steps"]:
        fields = {f: s[f] for f in _STEP_FIELDS}
        step = StepRun(spec=template.by_name[s["spec"]], **fields)
        run.steps[step.name] = step
    return run
