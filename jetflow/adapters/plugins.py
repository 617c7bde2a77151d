"""The plugin registry: each deployed version's source in the ``JF_PLUGINS`` object store
(``<name>/<version>``, with its sha256), and its life in the log: ``deployed`` (made
active; the version active before becomes superseded), ``activated`` (a rollback) and
``retired``, each appended with the expected sequence of the name's last plugin event,
so two deploys at once cannot both win. The events are the truth (folded by
:class:`~jetflow.core.plugin.PluginRegistry`); a stored object without one is no version.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from jetflow.adapters.bus import (
    BusError,
    Conflict,
    EventLog,
    Publisher,
    messages_on,
    stored_seq,
)
from jetflow.core import subjects as S
from jetflow.core.codec import CodecError, decode_event
from jetflow.core.events import Event
from jetflow.core.plugin import PluginError, PluginRegistry, read_plugin, source_sha256

__all__ = ["PluginStore", "Deployed"]


class Deployed(dict[str, Any]):
    """What a deploy recorded: name, version, sha256, outputs, requirements (and
    ``created``: whether this call made the version)."""


class PluginStore:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self._store: ObjectStore | None = None

    async def registry(self, name: str | None = None) -> PluginRegistry:
        """Every plugin's versions (or ``name``'s), from the log."""
        filter_ = S.entity_filter("plugin", name) if name else f"{S.PREFIX}.plugin.>"
        registry = PluginRegistry()
        for msg in await messages_on(self.js, [filter_]):
            seq = stored_seq(msg)
            try:
                registry.observe(decode_event(msg.subject, msg.data, seq))
            except CodecError:
                continue
        return registry

    async def deploy(self, path: str | Path, *, by: str = "") -> Deployed:
        """Store the plugin at ``path`` as a new version and make it active; the source
        already deployed is that version (``created`` false); PluginError otherwise."""
        p = Path(path)
        try:
            source = p.read_bytes()
        except OSError as exc:
            raise PluginError(f"cannot read {p}: {exc.strerror or exc}") from None
        meta = read_plugin(source, str(p))
        sha = source_sha256(source)
        for _ in range(5):
            registry = await self.registry(meta.name)
            same = registry.deploy_check(meta, sha)
            if same is not None:
                return Deployed(**same.as_json(), created=False)
            await (await self._bucket()).put(f"{meta.name}/{meta.version}", source)
            data = {"version": meta.version, "sha256": sha, "outputs": meta.outputs,
                    "requirements": list(meta.requirements), "by": by,
                    "parse_args": meta.parse_args, "bytes": len(source)}
            try:
                await self._append(meta.name, "deployed", data, registry)
            except Conflict:
                await asyncio.sleep(0.05)  # another deploy moved first: look again
                continue
            return Deployed(name=meta.name, status="active", deployed_at=time.time(),
                            **data, created=True)
        raise BusError(f"deploying {meta.name}: other deploys kept moving first")

    async def activate(self, name: str, version: str) -> dict[str, Any]:
        """Make ``version`` the active one again (a rollback, or undoing a retire)."""
        return await self._change(name, version, "activated")

    async def retire(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Retire ``version`` (default: the active one): jobs can no longer be submitted
        for it."""
        return await self._change(name, version, "retired")

    async def _change(self, name: str, version: str | None, type_: str) -> dict[str, Any]:
        for _ in range(5):
            registry = await self.registry(name)
            versions = registry.versions.get(name)
            if not versions:
                raise PluginError(f"no plugin {name!r} is deployed")
            if version is None:
                active = registry.active(name)
                if active is None:
                    raise PluginError(f"{name} has no active version; name one with "
                                      f"--version ({', '.join(versions)})")
                version = active.version
            target = versions.get(version)
            if target is None:
                raise PluginError(f"{name} has no version {version!r}; it has "
                                  f"{', '.join(versions)}")
            wanted = "active" if type_ == "activated" else "retired"
            if target.status == wanted:
                return {**target.as_json(), "changed": False}
            try:
                await self._append(name, type_, {"version": version}, registry)
            except Conflict:
                await asyncio.sleep(0.05)
                continue
            after = await self.registry(name)
            return {**after.versions[name][version].as_json(), "changed": True}
        raise BusError(f"{name}: other changes kept moving first")

    async def _append(self, name: str, type_: str, data: dict[str, Any],
                      registry: PluginRegistry) -> None:
        event = Event("plugin", name, type_, time.time(), data)
        expected = registry.last_seq.get(name, 0)
        await EventLog(Publisher(self.nc)).append(
            event, expected_seq=expected, msg_id=f"plugin:{name}:{type_}:{expected}")

    async def source(self, name: str, version: str, sha256: str) -> bytes:
        """A version's source, verified against its sha256 (PluginError if it differs)."""
        try:
            found = await (await self._bucket()).get(f"{name}/{version}")
        except nats.js.errors.NotFoundError:
            raise PluginError(f"no source stored for {name} {version}") from None
        data = found.data or b""
        if source_sha256(data) != sha256:
            raise PluginError(f"{name} {version}: the stored source has sha256 "
                              f"{source_sha256(data)[:12]}, not {sha256[:12]}: refused")
        return data

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self.js.object_store(S.PLUGIN_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                self._store = await self.js.create_object_store(S.PLUGIN_BUCKET)
        return self._store
