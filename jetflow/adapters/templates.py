"""The workflow template registry: each version of a template is stored once, immutable,
in the ``JF_TEMPLATES`` object store (``<name>/<version>``, the canonical JSON), and
recorded by a ``jf.wf.t:<name>.registered`` event in the log (name, version, sha256,
steps), appended with the expected sequence of the name's last registration, so two
registrations at once number their versions apart. The event is the truth: a stored
object without one is not a version.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from jetflow.adapters.bus import (
    BusError,
    Conflict,
    EventLog,
    Publisher,
    last_event_on,
    messages_on,
)
from jetflow.adapters.objects import read_object
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, decode_event, loads
from jetflow.core.events import Event
from jetflow.core.template import Template, TemplateError, canonical, digest, parse_template

__all__ = ["TemplateStore", "Registered"]


class Registered(dict[str, Any]):
    """What a registration recorded: name, version, sha256, steps (and ``created``:
    whether this call made the version)."""


class TemplateStore:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self._store: ObjectStore | None = None
        self._cache: dict[tuple[str, int], Template] = {}

    async def register(self, doc: Any, *, by: str = "") -> Registered:
        """Validate and store ``doc`` as the next version of its template; unchanged
        content is the version that has it (``created`` false)."""
        template = parse_template(doc)
        body = canonical(template)
        sha = digest(body)
        log = EventLog(Publisher(self.nc))
        for _ in range(5):
            latest = await self.latest(template.name)
            if latest is not None and latest["sha256"] == sha:
                return Registered(**latest, created=False)
            version = (latest["version"] if latest else 0) + 1
            await (await self._bucket()).put(f"{template.name}/{version}", orjson.dumps(body))
            event = Event("wf", f"t:{template.name}", "registered", time.time(),
                          {"name": template.name, "version": version, "sha256": sha,
                           "steps": len(template.steps), "label": template.version,
                           "description": template.description, "by": by})
            try:
                await log.append(event, expected_seq=latest["seq"] if latest else 0,
                                 msg_id=f"wf:t:{template.name}:registered:{version}")
            except Conflict:
                await asyncio.sleep(0.05)  # another registration moved first: look again
                continue
            return Registered(**event.data, created=True)
        raise BusError(f"registering {template.name}: other registrations kept moving first")

    async def latest(self, name: str) -> dict[str, Any] | None:
        """The last registration of ``name`` (its data and ``seq``), or None."""
        found = await last_event_on(self.nc, S.entity_filter("wf", f"t:{name}"))
        if found is None:
            return None
        seq, subject, data = found
        try:
            event = decode_event(subject, data, seq)
        except CodecError:
            return None
        return {**event.data, "seq": seq}

    async def get(self, name: str, version: int) -> Template:
        """The stored template; :class:`TemplateError` if there is none."""
        key = (name, version)
        if key not in self._cache:
            # by direct gets: a submitter reading a workflow may not create a consumer
            found = await read_object(self.js, S.TEMPLATE_BUCKET, f"{name}/{version}")
            if found is None:
                raise TemplateError(f"no template {name} v{version} is stored")
            self._cache[key] = parse_template(loads(found or b"{}"))
        return self._cache[key]

    async def names(self) -> list[dict[str, Any]]:
        """Every template's last registration, by name, with ``versions``: each version's
        number, sha256, step count and registration time (from the log's events)."""
        by_name: dict[str, dict[str, Any]] = {}
        for msg in await messages_on(self.js, [f"{S.PREFIX}.wf.*.registered"]):
            try:
                event = decode_event(msg.subject, msg.data, 0)
            except CodecError:
                continue
            d = event.data
            entry = by_name.setdefault(str(d["name"]), {"versions": []})
            entry.update({k: v for k, v in d.items()}, registered_at=event.at)
            entry["versions"].append({"version": d["version"], "sha256": d["sha256"],
                                      "steps": d["steps"], "registered_at": event.at})
        return [by_name[name] for name in sorted(by_name)]

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self.js.object_store(S.TEMPLATE_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                self._store = await self.js.create_object_store(S.TEMPLATE_BUCKET)
        return self._store
