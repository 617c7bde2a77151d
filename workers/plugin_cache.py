"""A worker's copies of plugin sources, by version: fetched from the ``JF_PLUGINS``
object store once, verified against the sha256 the job pinned (the child checks it again
before every load), kept under ``<data>/plugins/<name>/<version>-<sha>.py``."""

from __future__ import annotations

import os
from pathlib import Path

from nats.aio.client import Client as NATS

from jetflow.adapters.plugins import PluginStore
from jetflow.core.plugin import PluginMeta, read_plugin, source_sha256

__all__ = ["PluginCache"]


class PluginCache:
    def __init__(self, nc: NATS, directory: Path) -> None:
        self.store = PluginStore(nc)
        self.directory = directory
        self._meta: dict[Path, PluginMeta] = {}

    def meta(self, path: Path) -> PluginMeta:
        """The constants of a cached source (read once: a cached file never changes, its
        name holds its sha256)."""
        if path not in self._meta:
            self._meta[path] = read_plugin(path.read_bytes(), str(path))
        return self._meta[path]

    def requirements(self, path: Path) -> tuple[str, ...]:
        return self.meta(path).requirements

    async def path(self, name: str, version: str, sha256: str) -> Path:
        """The cached source file (fetched and verified if it is not there yet);
        PluginError if the store has no such source or it is not the one pinned."""
        path = self.directory / name / f"{version}-{sha256[:16]}.py"
        if path.exists() and source_sha256(path.read_bytes()) == sha256:
            return path
        source = await self.store.source(name, version, sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(source)
        os.replace(tmp, path)
        return path
