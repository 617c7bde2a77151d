"""Virtual environments for plugins with ``REQUIREMENTS``: one per set of requirements,
keyed by the sha256 of their normalised form (two plugins that need the same share one),
under ``<data>/envs/<key>/``, the least recently used removed beyond ``keep``.

An environment is made without pip (``python -m venv --without-pip``) and filled by the
worker's own pip (``pip --python``); a ``.pth`` file adds the worker's site-packages
after its own, so the child (``jetflow.workers.child``) and pyarrow import there while a
plugin's pinned requirements come first. It is built in a temporary directory and renamed
into place once pip succeeded: a half-built one is never used. A failed install is a
:class:`~jetflow.core.plugin.PluginError` with the installer's message."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import site
import sys
import time
from pathlib import Path

from jetflow.core.plugin import PluginError, normalised_requirements

__all__ = ["Environments", "env_key"]

log = logging.getLogger("jetflow.worker")
READY = ".jetflow-ready"


def env_key(requirements: tuple[str, ...] | list[str]) -> str:
    return hashlib.sha256(normalised_requirements(requirements).encode()).hexdigest()


class Environments:
    def __init__(self, directory: Path, *, keep: int = 8, timeout_s: float = 600.0) -> None:
        self.directory = directory
        self.keep = keep
        self.timeout_s = timeout_s
        self._locks: dict[str, asyncio.Lock] = {}

    def python_of(self, key: str) -> Path:
        return self.directory / key[:32] / "bin" / "python"

    async def python_for(self, requirements: tuple[str, ...] | list[str]) -> Path:
        """The interpreter of the environment for ``requirements``, built if needed."""
        key = env_key(requirements)
        home = self.directory / key[:32]
        async with self._locks.setdefault(key, asyncio.Lock()):
            if not (home / READY).exists():
                await self._build(home, list(requirements))
            (home / READY).touch()  # used now: the last to go
        self._prune()
        return self.python_of(key)

    async def _build(self, home: Path, requirements: list[str]) -> None:
        started = time.monotonic()
        tmp = home.with_name(f".{home.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._run([sys.executable, "-m", "venv", "--without-pip", str(tmp)],
                            "creating the environment")
            own = next(tmp.glob("lib/python*/site-packages"))
            base = [p for p in site.getsitepackages() if Path(p).is_dir()]
            (own / "_jetflow_worker.pth").write_text(
                "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in base) + "\n")
            await self._run([sys.executable, "-m", "pip", "--python", str(tmp / "bin/python"),
                             "install", "--disable-pip-version-check", "--no-input", "-q",
                             *requirements], f"installing {', '.join(requirements)}")
            (tmp / READY).touch()
            shutil.rmtree(home, ignore_errors=True)
            os.replace(tmp, home)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("environment %s ready for %s in %.1fs", home.name[:12],
                 ", ".join(requirements), time.monotonic() - started)

    async def _run(self, cmd: list[str], what: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PIP_NO_WARN_SCRIPT_LOCATION": "1"})
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise PluginError(f"{what}: no end after {self.timeout_s:g}s") from None
        if proc.returncode:
            lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
            said = " | ".join(lines[-6:])[-1500:] or f"exit {proc.returncode}"
            raise PluginError(f"{what} failed: {said}")

    def _prune(self) -> None:
        """Remove the least recently used environments beyond ``keep``."""
        ready = sorted((p for p in self.directory.glob("*/" + READY)),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        for marker in ready[self.keep:]:
            with contextlib.suppress(OSError):
                shutil.rmtree(marker.parent)
                log.info("environment %s removed (least recently used)", marker.parent.name)
