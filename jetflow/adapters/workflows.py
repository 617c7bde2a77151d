"""Workflows from a client's side: register a template, start a workflow, read what it
looks like (:func:`~jetflow.core.workflow_view.fold_workflow` over its events and its
steps' events, read from JF_EVENTS), wait for its end, list them, cancel one."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import nats.errors
import yaml
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from jetflow.adapters.bus import TIMEOUTS, last_event_on, messages_on, stored_seq
from jetflow.adapters.templates import TemplateStore
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, decode_event, dumps
from jetflow.core.events import Event
from jetflow.core.template import Template, TemplateError
from jetflow.core.workflow import WF_TERMINAL, step_job_id
from jetflow.core.workflow_view import WorkflowView, fold_workflow, template_of

__all__ = ["load_template_file", "start_body", "read_view", "wait_end", "WorkflowFailed",
           "list_workflows"]


class WorkflowFailed(Exception):
    """``wait_workflow(..., raise_on_failure=True)`` on a workflow that did not succeed."""

    def __init__(self, view: WorkflowView) -> None:
        super().__init__(f"workflow {view.workflow_id} {view.state}"
                         + (f": {view.reason}" if view.reason else ""))
        self.view = view


def load_template_file(path: str | Path) -> Any:
    """The YAML document of a template file; TemplateError naming the file otherwise."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except OSError as exc:
        raise TemplateError(f"cannot read {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise TemplateError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None


def start_body(name: str, context: Any, *, version: int | None, workflow_id: str | None,
               correlation_id: str | None) -> tuple[bytes, dict[str, str]]:
    body: dict[str, Any] = {"workflow": name, "context": context}
    if version is not None:
        body["version"] = version
    if workflow_id is not None:
        body["workflow_id"] = workflow_id
    if correlation_id is not None:
        body["correlation_id"] = correlation_id
    return dumps(body), {S.HDR_MSG_ID: workflow_id or f"wf-{uuid.uuid4().hex}"}


async def read_view(nc: NATS, js: JetStreamContext, store: TemplateStore,
                    workflow_id: str) -> WorkflowView:
    """The workflow as its events say (state ``unknown`` if it has none)."""
    S.check_job_id(workflow_id)
    own = _events(await messages_on(js, [S.entity_filter("wf", workflow_id)]))
    named = template_of(own)
    if named is None:
        return fold_workflow(workflow_id, None, own)
    start = min(e.seq for e in own)
    template: Template | None
    try:
        template = await store.get(*named)
    except TemplateError:
        template = None
    if template is None:
        return fold_workflow(workflow_id, None, own)
    read: set[str] = set()
    events = list(own)
    while True:  # a batch step's instances are known once its result is read
        view = fold_workflow(workflow_id, template, events)
        names = set(view.steps) | {s.name for s in template.steps}
        ids = sorted({step_job_id(workflow_id, n) for n in names} - read)
        if not ids:
            return view
        read.update(ids)
        events += _events(await messages_on(js, [S.job_filter(i) for i in ids], start))


def _events(msgs: list[Any]) -> list[Event]:
    out = []
    for m in msgs:
        with contextlib.suppress(CodecError):
            out.append(decode_event(m.subject, m.data, _seq(m)))
    return out


def _seq(msg: Any) -> int:
    return stored_seq(msg)


async def wait_end(nc: NATS, workflow_id: str, timeout: float | None) -> str:
    """Wait until the workflow has ended; its end state (TimeoutError after ``timeout``)."""
    changed = asyncio.Event()

    async def moved(_msg: Any) -> None:
        changed.set()

    sub = await nc.subscribe(f"{S.PREFIX}.wf.{workflow_id}.*", cb=moved)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        while True:
            changed.clear()
            try:
                last = await last_event_on(nc, S.entity_filter("wf", workflow_id))
            except (*TIMEOUTS, nats.errors.NoRespondersError):
                last = None
            if last is not None and (state := last[1].rsplit(".", 1)[-1]) in WF_TERMINAL:
                return state
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(f"workflow {workflow_id} did not end within {timeout:g}s")
            with contextlib.suppress(TimeoutError):  # a poll now and then: a lost message
                await asyncio.wait_for(changed.wait(), min(2.0, left or 2.0))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def list_workflows(js: JetStreamContext, *, state: str | None = None,
                         name: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Workflows from their own events (not their steps'): id, name, version, state,
    started and finished times, the last ``limit`` started."""
    msgs = await messages_on(js, [f"{S.PREFIX}.wf.*.{t}" for t in
                                  ("started", *sorted(WF_TERMINAL))])
    rows: dict[str, dict[str, Any]] = {}
    for e in _events(msgs):
        if e.id.startswith("t:"):
            continue
        if e.type == "started":
            rows[e.id] = {"workflow_id": e.id, "name": e.data["template"],
                          "version": e.data["version"], "state": "running",
                          "started_at": e.at, "finished_at": None, "reason": None}
        elif e.id in rows:
            rows[e.id].update(state=e.type, finished_at=e.at, reason=e.data.get("reason"))
    out = [r for r in rows.values() if (state is None or r["state"] == state)
           and (name is None or r["name"] == name)]
    return out[-limit:]
