"""Workflow templates: the YAML model, its validation and its canonical form. Pure.

A template is ``name``, ``version`` (the author's label; the registry numbers what it
stores), ``description``, optional ``queue``, ``fail_fast`` and ``steps``; a step is
``name``, ``handler``, ``depends_on``, ``type`` (standard, decision, convergence, batch,
batch_worker), optional ``args``, ``retry``, ``timeout_s``, ``max_attempts``,
``continue_on_failure`` and, for a batch step, ``worker``. :func:`parse_template` turns a
document (YAML already loaded) into a :class:`Template` or raises :class:`TemplateError`
naming the problem; :func:`canonical` is what is stored and hashed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from jetflow.core.codec import dumps

__all__ = ["Template", "StepSpec", "TemplateError", "parse_template", "canonical",
           "digest", "STEP_TYPES", "MAX_STEPS", "MAX_TEMPLATE_BYTES", "unknown_handlers"]

STEP_TYPES = ("standard", "decision", "convergence", "batch", "batch_worker")
MAX_STEPS = 10_000
MAX_TEMPLATE_BYTES = 4 << 20  # a template's stored form
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
HANDLER_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}\Z")
_TOP = {"name", "version", "description", "queue", "fail_fast", "steps"}
_STEP = {"name", "handler", "depends_on", "type", "args", "retry", "timeout_s",
         "max_attempts", "continue_on_failure", "worker", "description"}


class TemplateError(ValueError):
    """A template that cannot be used; the message names the problem."""


@dataclass(frozen=True, slots=True)
class StepSpec:
    name: str
    handler: str
    type: str = "standard"
    depends_on: tuple[str, ...] = ()
    args: Any = None
    retry: dict[str, float] | None = None
    timeout_s: float | None = None
    max_attempts: int | None = None
    continue_on_failure: bool = False
    worker: str | None = None


@dataclass(frozen=True)
class Template:
    name: str
    steps: tuple[StepSpec, ...]
    version: str = ""  # the author's label
    description: str = ""
    queue: str | None = None
    fail_fast: bool = False
    by_name: dict[str, StepSpec] = field(default_factory=dict, compare=False)
    children: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.by_name.update({s.name: s for s in self.steps})
        kids: dict[str, list[str]] = {s.name: [] for s in self.steps}
        for s in self.steps:
            for parent in s.depends_on:
                kids[parent].append(s.name)
        self.children.update({k: tuple(v) for k, v in kids.items()})

    @property
    def sinks(self) -> tuple[str, ...]:
        """The steps nothing depends on: their results are the workflow's."""
        return tuple(s.name for s in self.steps if not self.children[s.name])

    @property
    def roots(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps if not s.depends_on)


def parse_template(doc: Any) -> Template:
    if not isinstance(doc, Mapping):
        raise TemplateError("a template is a mapping with 'name' and 'steps'")
    unknown = sorted(set(doc) - _TOP)
    if unknown:
        raise TemplateError(f"unknown template field(s) {unknown}; known: {sorted(_TOP)}")
    name = _name("", doc.get("name"))
    steps_doc = doc.get("steps")
    if not isinstance(steps_doc, list) or not steps_doc:
        raise TemplateError(f"{name}: 'steps' must be a non-empty list")
    if len(steps_doc) > MAX_STEPS:
        raise TemplateError(f"{name}: {len(steps_doc):,} steps, more than {MAX_STEPS:,}")
    steps = tuple(_step(name, i, s) for i, s in enumerate(steps_doc))
    _check_graph(name, steps)
    queue = doc.get("queue")
    if queue is not None and (not isinstance(queue, str) or not NAME_RE.match(queue)):
        raise TemplateError(f"{name}: 'queue' must be a queue name, got {queue!r}")
    fail_fast = doc.get("fail_fast", False)
    if not isinstance(fail_fast, bool):
        raise TemplateError(f"{name}: 'fail_fast' must be true or false")
    template = Template(name, steps, str(doc.get("version", "")),
                        str(doc.get("description", "")), queue, fail_fast)
    size = len(dumps(canonical(template)))
    if size > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"{name}: {size:,} bytes stored, more than {MAX_TEMPLATE_BYTES:,}")
    return template


def _step(template: str, i: int, doc: Any) -> StepSpec:
    where = f"{template}: step #{i + 1}"
    if not isinstance(doc, Mapping):
        raise TemplateError(f"{where} is not a mapping")
    name = _name(f"{where}: ", doc.get("name"))
    where = f"{template}: step {name!r}"
    unknown = sorted(set(doc) - _STEP)
    if unknown:
        raise TemplateError(f"{where}: unknown field(s) {unknown}; known: {sorted(_STEP)}")
    handler = doc.get("handler")
    if not isinstance(handler, str) or not HANDLER_RE.match(handler):
        raise TemplateError(f"{where}: 'handler' must be a handler name, got {handler!r}")
    type_ = doc.get("type", "standard")
    if type_ not in STEP_TYPES:
        raise TemplateError(f"{where}: unknown type {type_!r}; types: {', '.join(STEP_TYPES)}")
    deps = doc.get("depends_on", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise TemplateError(f"{where}: 'depends_on' must be a list of step names")
    return StepSpec(name, handler, type_, tuple(dict.fromkeys(deps)), doc.get("args"),
                    _retry(where, doc.get("retry")), _positive(where, doc, "timeout_s"),
                    _attempts(where, doc.get("max_attempts")),
                    _flag(where, doc, "continue_on_failure"), _worker(where, type_, doc))


def _name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise TemplateError(f"{where}'name' must be 1-64 of A-Z a-z 0-9 _ -, got {value!r}")
    return value


def _retry(where: str, value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    fields = {"base_s", "factor", "cap_s", "jitter"}
    if not isinstance(value, Mapping) or not set(value) <= fields or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
        raise TemplateError(f"{where}: 'retry' takes numbers for any of {sorted(fields)}")
    return {k: float(v) for k, v in value.items()}


def _positive(where: str, doc: Mapping[str, Any], key: str) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise TemplateError(f"{where}: {key!r} must be a number of seconds above 0")
    return float(value)


def _attempts(where: str, value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= 100:
        raise TemplateError(f"{where}: 'max_attempts' must be an integer from 1 to 100")
    return value


def _flag(where: str, doc: Mapping[str, Any], key: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise TemplateError(f"{where}: {key!r} must be true or false")
    return value


def _worker(where: str, type_: str, doc: Mapping[str, Any]) -> str | None:
    worker = doc.get("worker")
    if type_ != "batch":
        if worker is not None:
            raise TemplateError(f"{where}: only a batch step names a 'worker'")
        return None
    if not isinstance(worker, str):
        raise TemplateError(f"{where}: a batch step names its batch_worker step in 'worker'")
    return worker


def _check_graph(template: str, steps: tuple[StepSpec, ...]) -> None:
    names: dict[str, StepSpec] = {}
    for s in steps:
        if s.name in names:
            raise TemplateError(f"{template}: duplicate step name {s.name!r}")
        names[s.name] = s
    children: dict[str, list[str]] = {s.name: [] for s in steps}
    for s in steps:
        for parent in s.depends_on:
            if parent not in names:
                raise TemplateError(f"{template}: step {s.name!r} depends on unknown step "
                                    f"{parent!r}")
            children[parent].append(s.name)
    for s in steps:
        _check_kind(template, s, names, children[s.name])
    cycle = _find_cycle(names, children)
    if cycle:
        raise TemplateError(f"{template}: a cycle: {' -> '.join(cycle)}")


def _check_kind(template: str, s: StepSpec, names: Mapping[str, StepSpec],
                kids: list[str]) -> None:
    where = f"{template}: step {s.name!r}"
    if s.type in ("decision", "batch") and not kids:
        raise TemplateError(f"{where} is a {s.type} step without children")
    if s.type == "batch":
        worker = names.get(s.worker or "")
        if worker is None or worker.type != "batch_worker" or s.name not in worker.depends_on:
            raise TemplateError(f"{where}: its worker {s.worker!r} is not a batch_worker "
                                "step that depends on it")
    if s.type == "batch_worker":
        batch = [p for p in s.depends_on if names[p].type == "batch"
                 and names[p].worker == s.name] if all(p in names for p in s.depends_on) else []
        if len(s.depends_on) != 1 or len(batch) != 1:
            raise TemplateError(f"{where}: a batch_worker depends on exactly the one batch step "
                                "that names it as its worker")


def _find_cycle(names: Mapping[str, StepSpec], children: Mapping[str, list[str]]
                ) -> list[str] | None:
    """A cycle's steps in order (the first closing one), or None: an iterative DFS."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    for root in names:
        if root in state:
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0:
                state[node] = 1
                path.append(node)
            kids = children[node]
            if i < len(kids):
                stack.append((node, i + 1))
                kid = kids[i]
                if state.get(kid) == 1:
                    return [*path[path.index(kid):], kid]
                if kid not in state:
                    stack.append((kid, 0))
            else:
                state[node] = 2
                path.pop()
    return None


def canonical(t: Template) -> dict[str, Any]:
    """The stored form: every field, in a fixed order (what :func:`digest` hashes)."""
    return {"name": t.name, "version": t.version, "description": t.description,
            "queue": t.queue, "fail_fast": t.fail_fast,
            "steps": [{"name": s.name, "handler": s.handler, "type": s.type,
                       "depends_on": list(s.depends_on), "args": s.args, "retry": s.retry,
                       "timeout_s": s.timeout_s, "max_attempts": s.max_attempts,
                       "continue_on_failure": s.continue_on_failure, "worker": s.worker}
                      for s in t.steps]}


def digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(dumps(doc)).hexdigest()


def unknown_handlers(t: Template, known: Collection[str]) -> list[str]:
    """The handlers of ``t`` no worker has announced (a warning, not an error)."""
    return sorted({s.handler for s in t.steps} - set(known))
