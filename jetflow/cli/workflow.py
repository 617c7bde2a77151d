"""``jetflow workflow register|list|start|show|cancel`` and ``jetflow workflows``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jetflow.cli.options import CommandError, common_options, json_arg, positive_int, seconds
from jetflow.cli.output import error

if TYPE_CHECKING:
    from jetflow.adapters.client import Client
    from jetflow.core.workflow_view import WorkflowView

__all__ = ["add_commands"]

STATES = ("running", "succeeded", "failed", "cancelled")


def _is_file(target: str) -> bool:
    return target.endswith((".yaml", ".yml", ".json")) or "/" in target or Path(target).is_file()


async def _client(a: argparse.Namespace) -> Client:
    from jetflow.adapters.client import connect

    return await connect(a.nats)


async def _register(client: Client, path: str, a: argparse.Namespace) -> dict[str, Any]:
    from jetflow.adapters.workflows import load_template_file
    from jetflow.core.template import TemplateError, parse_template, unknown_handlers

    try:
        doc = load_template_file(path)
        template = parse_template(doc)
    except TemplateError as exc:
        raise CommandError(f"{path}: {exc}") from None
    registered = dict(await client.register_workflow(doc, by="cli"))
    handlers = await _announced_handlers(client)
    missing = unknown_handlers(template, handlers) if handlers is not None else []
    if missing:
        registered["warnings"] = [f"no worker has announced handler(s) {', '.join(missing)} "
                                  "yet: its steps wait until one does"]
        for w in registered["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
    return registered


async def _announced_handlers(client: Client) -> list[str] | None:
    """The handlers live workers serve, as a sentinel knows them; None if none answers."""
    from jetflow.adapters.bus import TIMEOUTS
    from jetflow.core import subjects as S
    from jetflow.core.codec import loads

    try:
        reply = await client.nc.request(S.SENTINEL_PING, b"", timeout=2.0)
        handlers = loads(reply.data).get("handlers")
    except (*TIMEOUTS, Exception):  # noqa: BLE001 - no sentinel: no warning to give
        return None
    return [str(h) for h in handlers] if isinstance(handlers, list) else None


def _registered_line(r: dict[str, Any]) -> str:
    verb = "registered" if r.get("created") else "unchanged,"
    return (f"{verb} {r['name']} v{r['version']} ({r['steps']} steps, sha256 "
            f"{str(r['sha256'])[:12]})")


async def cmd_register(a: argparse.Namespace) -> int:
    client = await _client(a)
    try:
        registered = await _register(client, a.file, a)
    finally:
        await client.close()
    print(json.dumps(registered) if a.json else _registered_line(registered))
    return 0


async def cmd_list(a: argparse.Namespace) -> int:
    client = await _client(a)
    try:
        rows = await client.templates()
    finally:
        await client.close()
    if a.json:
        print(json.dumps([{k: r.get(k) for k in ("name", "version", "steps", "sha256",
                                                  "label", "description", "registered_at",
                                                  "versions")} for r in rows]))
        return 0
    if not rows:
        print("no workflow templates registered (jetflow workflow register FILE)")
        return 0
    width = max(len(str(r["name"])) for r in rows)
    print(f"{'NAME':<{width}}  LATEST  VERSIONS  STEPS  SHA256        REGISTERED           "
          "DESCRIPTION")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["registered_at"]))
        print(f"{r['name']:<{width}}  {r['version']:>6}  {len(r['versions']):>8}  "
              f"{r['steps']:>5}  {str(r['sha256'])[:12]}  {when}  {r.get('description') or ''}")
    return 0


async def cmd_start(a: argparse.Namespace) -> int:
    from jetflow.adapters.client import SubmissionRejected

    context = json_arg(a.context, "--context", object_only=False)
    client = await _client(a)
    try:
        name, version = a.target, a.version
        if _is_file(a.target):
            registered = await _register(client, a.target, a)
            if registered.get("created") and not a.json:
                print(_registered_line(registered), file=sys.stderr)
            name, version = str(registered["name"]), version or int(registered["version"])
        try:
            workflow_id = await client.start_workflow(
                name, context, version=version, queue=a.queue, workflow_id=a.workflow_id)
        except SubmissionRejected as exc:
            if a.json:
                print(json.dumps({"workflow_id": None,
                                  "rejected": {"code": exc.code, "reason": exc.reason}}))
            else:
                print(f"rejected: {exc.reason} [{exc.code}]", file=sys.stderr)
            return 2
        if not a.wait:
            print(json.dumps({"workflow_id": workflow_id}) if a.json else workflow_id)
            return 0
        try:
            view = await client.wait_workflow(workflow_id, timeout=a.wait_timeout)
        except TimeoutError:
            view = await client.workflow_status(workflow_id)
            return error(a, f"timed out: workflow {workflow_id} is still {view.state} after "
                            f"{a.wait_timeout:g}s; it goes on (`jetflow workflow show "
                            f"{workflow_id}`)", workflow_id=workflow_id, state=view.state)
    finally:
        await client.close()
    _print_view(view, a.json)
    return 0 if view.state == "succeeded" else 1


async def cmd_show(a: argparse.Namespace) -> int:
    client = await _client(a)
    try:
        view = await client.workflow_status(a.workflow_id)
    finally:
        await client.close()
    if view.state == "unknown":
        return error(a, f"no workflow {a.workflow_id!r} in the log", workflow_id=a.workflow_id)
    _print_view(view, a.json)
    return 0


async def cmd_cancel(a: argparse.Namespace) -> int:
    client = await _client(a)
    try:
        answer = await client.cancel_workflow(a.workflow_id, a.reason)
    finally:
        await client.close()
    if a.json:
        print(json.dumps(answer))
    else:
        print(answer.get("message") or f"{a.workflow_id}: cancel requested (pending steps "
                                       "are skipped, running ones stopped)")
    return 0


async def cmd_workflows(a: argparse.Namespace) -> int:
    client = await _client(a)
    try:
        rows = await client.workflows(state=a.state, name=a.name)
    finally:
        await client.close()
    rows = rows[-a.limit:]
    if a.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no workflows" + (" matching" if a.state or a.name else "") + " in the log")
        return 0
    now = time.time()
    print(f"{'WORKFLOW':<22}  {'NAME':<20}  {'VER':>3}  {'STATE':<9}  {'STARTED':<19}  TOOK")
    for r in rows:
        took = (r["finished_at"] or now) - r["started_at"]
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started_at"]))
        print(f"{r['workflow_id']:<22}  {r['name']:<20}  {r['version']:>3}  {r['state']:<9}  "
              f"{started}  {_duration(took)}")
    return 0


# -- drawing a workflow ---------------------------------------------------------------------

MARKS = {"succeeded": "✔", "failed": "✘", "cancelled": "■", "skipped": "⊘",
         "running": "▶", "queued": "…", "pending": "○"}


def _print_view(view: WorkflowView, as_json: bool) -> None:
    now = time.time()
    if as_json:
        print(json.dumps(view.as_json(now)))
        return
    print(draw(view, now))


def draw(view: WorkflowView, now: float) -> str:
    """The DAG, a level per row group: each step with its state, attempts and duration,
    and the steps it waits for."""
    took = _duration((view.finished_at or now) - view.started_at) if view.started_at else "-"
    lines = [f"{view.workflow_id}  {view.name} v{view.version}  {view.state}  ({took})"]
    if view.reason:
        lines.append(f"  reason: {view.reason}")
    level: dict[str, int] = {}
    for name, step in view.steps.items():  # the template's order is a topological one
        level[name] = 1 + max((level.get(p, 0) for p in step.depends_on), default=-1)
    width = max((len(n) + 2 * level[n] for n in view.steps), default=10)
    order = []  # the template's order (a topological one), each batch's instances after it
    for name, step in view.steps.items():
        if step.instance_of is None:
            order.append(name)
            order += [n for n, s in view.steps.items() if s.instance_of == name]
    for name in order:
        step = view.steps[name]
        mark = MARKS.get(step.state, "?")
        label = "  " * level[name] + name
        dur = step.duration_s(now)
        extra = f"  ← {', '.join(step.depends_on)}" if step.depends_on else ""
        lines.append(f"  {mark} {label:<{width}}  {step.state:<9}  {step.attempts}×  "
                     f"{_duration(dur) if dur is not None else '-':>8}{extra}")
        if step.state in ("failed", "cancelled", "skipped") and step.error:
            message = step.error.get("message") if isinstance(step.error, dict) else step.error
            lines.append(f"    {' ' * (2 * level[name])}{message}")
    lines.append(f"result: {json.dumps(view.result)}")
    return "\n".join(lines)


def _duration(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min"


def add_commands(sub: Any) -> None:
    wf = sub.add_parser("workflow", help="register, start, show and cancel workflows",
                        description="Workflows: DAGs of steps, each step a job (see the "
                                    "README's Workflows section).")
    common_options(wf)
    cmds = wf.add_subparsers(dest="workflow_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("register", help="validate and store a template (YAML) as its next "
                                         "version; unchanged content is a no-op")
    common_options(p)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_register)

    p = cmds.add_parser("list", help="registered templates: names, versions, step counts")
    common_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_list)

    p = cmds.add_parser("start", help="start a workflow of a template (a FILE is registered "
                                      "first)",
                        description="Start a workflow; prints its id (with --wait, the "
                                    "outcome: exit 0 if it succeeded, 1 otherwise, 2 if "
                                    "rejected).")
    common_options(p, context_flag=False)  # --context is the workflow's here
    p.add_argument("target", metavar="NAME|FILE")
    p.add_argument("--version", type=positive_int, help="template version (default latest)")
    p.add_argument("--context", default="{}", metavar="JSON|@FILE|-",
                   help="the workflow's context (every step sees it): JSON, @FILE or - ({})")
    p.add_argument("--queue", default="default", help="the queue its steps run on")
    p.add_argument("--workflow-id", help="your own id; starting it again is the same "
                                         "workflow")
    p.add_argument("--wait", action="store_true", help="wait for the outcome")
    p.add_argument("--wait-timeout", type=seconds, default=600.0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_start)

    p = cmds.add_parser("show", help="draw a workflow's DAG with each step's state, attempts "
                                     "and duration")
    common_options(p)
    p.add_argument("workflow_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_show)

    p = cmds.add_parser("cancel", help="cancel every pending and running step")
    common_options(p)
    p.add_argument("workflow_id", metavar="ID")
    p.add_argument("--reason", help="recorded in the cancel_requested event")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_cancel)

    p = sub.add_parser("workflows", help="list workflows (--state, --name)")
    common_options(p)
    p.add_argument("--state", choices=STATES)
    p.add_argument("--name", help="only this template's")
    p.add_argument("--limit", type=positive_int, default=100, help="the last N (100)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_workflows)
