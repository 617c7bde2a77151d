"""Human tables for the read commands (rich). Input is the ``--json`` shape of each
command, so what people see and what machines read never disagree."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from jetflow.projections.queries import STATE_ORDER

__all__ = ["console", "status_view", "workers_view", "jobs_view", "errors_view", "when",
           "age"]


def console(*, stderr: bool = False) -> Console:
    """A console for stdout (or stderr): styled on a terminal, plain and wide otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(file=stream, width=None if tty else 200, no_color=not tty,
                   highlight=False, soft_wrap=not tty)


def when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _position(as_of: dict[str, Any]) -> Text:
    errors = as_of.get("projection_errors") or 0
    kind = "replay snapshot" if as_of.get("snapshot") else "as"
    text = f"{kind} of stream seq {as_of['seq']}, " + (
        f"last event {when(as_of['at'])} UTC" if as_of["at"] is not None else "no events yet")
    if errors:
        text += f"  ({errors} projection error(s): `jetflow errors` lists them)"
    return Text(text, style="dim")


def status_view(view: dict[str, Any]) -> RenderableType:
    """The queue view: states per queue, then queued jobs per priority."""
    queues = view["queues"]
    if not queues:
        return Group(_position(view["as_of"]), Text("no jobs yet"))
    return Group(_position(view["as_of"]), _states_table(queues, view["window_minutes"]),
                 _depth_table(queues))


def _states_table(queues: list[dict[str, Any]], minutes: int) -> Table:
    states = _state_columns(queues)
    table = Table(title="queues", title_justify="left")
    table.add_column("queue", no_wrap=True, min_width=min(24, _longest(queues)))
    for state in states:
        table.add_column(state, justify="right")
    table.add_column("total", justify="right")
    table.add_column("oldest queued", justify="right")
    table.add_column(f"ok/min ({minutes}m)", justify="right")
    table.add_column(f"failed/min ({minutes}m)", justify="right")
    for q in queues:
        oldest = q["oldest_queued"]
        done = sum(m["succeeded"] for m in q["per_minute"]) / minutes
        failed = sum(m["failed"] for m in q["per_minute"]) / minutes
        table.add_row(q["queue"] or "-", *(str(q["states"].get(s, 0)) for s in states),
                      str(q["total"]), age(oldest["age_s"]) if oldest else "-",
                      f"{done:.1f}", f"{failed:.1f}")
    return table


def _longest(queues: list[dict[str, Any]]) -> int:
    """The longest queue name: the column the eye looks for first is not squeezed."""
    return max((len(q["queue"] or "-") for q in queues), default=5)


def _state_columns(queues: list[dict[str, Any]]) -> list[str]:
    seen = {state for q in queues for state in q["states"]}
    known = [s for s in STATE_ORDER if s in seen]
    return known + sorted(seen - set(known))


def _depth_table(queues: list[dict[str, Any]]) -> RenderableType:
    priorities = sorted({int(p) for q in queues for p in q["depth"]}, reverse=True)
    if not priorities:
        return Text("no queued jobs", style="dim")
    table = Table(title="queued jobs by priority", title_justify="left")
    table.add_column("queue", no_wrap=True, min_width=min(24, _longest(queues)))
    for p in priorities:
        table.add_column(f"p{p}", justify="right")
    for q in queues:
        if q["depth"]:
            table.add_row(q["queue"] or "-", *(str(q["depth"].get(str(p), 0))
                                               for p in priorities))
    return table


def workers_view(workers: list[dict[str, Any]], as_of: dict[str, Any],
                 heartbeat_note: str = "") -> RenderableType:
    table = Table(title="workers", title_justify="left")
    for name in ("worker", "host", "pid", "status", "handlers", "conc", "running",
                 "heartbeat", "ok", "failed"):
        table.add_column(name, justify="right" if name in ("pid", "conc", "ok", "failed")
                         else "left")
    for w in workers:
        beat = w["last_heartbeat"]
        running = ",".join(w["current_jobs"][:3]) + (" …" if len(w["current_jobs"]) > 3 else "")
        table.add_row(w["worker_id"], w["host"] or "-", str(w["pid"] or "-"), w["status"],
                      ",".join(w["handlers"]), str(w["concurrency"]),
                      f"{len(w['current_jobs'])} {running}".strip(),
                      f"{age(beat['age_s'])} ago" if beat else "-",
                      str(w["succeeded"]), str(w["failed"]))
    parts: list[RenderableType] = [_position(as_of), table]
    if heartbeat_note:
        parts.append(Text(heartbeat_note, style="dim"))
    return Group(*parts)


def errors_view(errors: list[dict[str, Any]], as_of: dict[str, Any]) -> RenderableType:
    """Messages in the log the projector recorded instead of applying."""
    if not errors:
        return Group(_position(as_of), Text("no projection errors"))
    table = Table(title=f"projection errors ({len(errors)} shown, latest first)",
                  title_justify="left")
    for name in ("seq", "subject", "code", "reason", "body"):
        table.add_column(name)
    for e in errors:
        table.add_row(str(e["seq"]), e["subject"], e["code"], e["reason"], (e["raw"] or "")[:60])
    return Group(_position(as_of), table)


def jobs_view(jobs: list[dict[str, Any]], as_of: dict[str, Any]) -> RenderableType:
    table = Table(title=f"jobs ({len(jobs)} shown, most recent first)", title_justify="left")
    for name in ("job", "queue", "handler", "prio", "state", "attempt", "worker",
                 "submitted", "finished", "result / error"):
        table.add_column(name)
    for j in jobs:
        error = j["error"] or {}
        outcome = (j["result"] or "") if not error else \
            f"{error.get('error_type') or error.get('type', '')}: {error.get('message', '')}"
        table.add_row(j["job_id"], j["queue"] or "-", j["handler"] or "-", str(j["priority"]),
                      j["state"], f"{j['attempt']}/{j['max_attempts']}", j["worker"] or "-",
                      when(j["submitted_at"]), when(j["finished_at"]), outcome[:80])
    return Group(_position(as_of), table)
