"""The secured stacks ``jetflow up`` runs on this machine, so that a command run here
finds their credentials by itself, from any directory.

While it runs, each writes ``<state>/stacks/<port>.json`` (0600: ``url``, ``data``,
``pid``), where ``<state>`` is ``$JETFLOW_STATE_DIR``, else ``$XDG_STATE_HOME/jetflow``,
else ``~/.local/state/jetflow``; it removes the file when it stops. A command aimed at
a local URL reads the entry for that port, and uses the context files under the stack's
``<data>/contexts/`` when the stack's process is alive and the files are readable: that
is, by the user who ran ``jetflow up``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from jetflow.adapters.credentials import write_private

__all__ = ["STATE_ENV", "state_dir", "register", "unregister", "find"]

STATE_ENV = "JETFLOW_STATE_DIR"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}


def state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "jetflow"


def _entry(port: int) -> Path:
    return state_dir() / "stacks" / f"{port}.json"


def _port_of(url: str) -> int | None:
    """The port of ``url`` if it names this machine (4222 when it gives none)."""
    first = url.split(",")[0].strip()
    parts = urlsplit(first if "://" in first else f"nats://{first}")
    host = parts.hostname or ""
    if host not in LOCAL_HOSTS and host != socket.gethostname():
        return None
    try:
        return parts.port or 4222
    except ValueError:
        return None


def register(url: str, data_dir: Path) -> Path | None:
    """Say that this process runs a secured stack at ``url`` (a local one) keeping its
    files in ``data_dir``; the entry's path, or None if it could not be written."""
    port = _port_of(url)
    if port is None:
        return None
    path = _entry(port)
    try:
        write_private(path, json.dumps({"url": url, "data": str(data_dir),
                                        "pid": os.getpid(), "started": _started(os.getpid())}))
    except OSError:
        return None
    return path


def unregister(path: Path | None) -> None:
    """Remove this process's entry (not one a later stack on the same port wrote)."""
    if path is None:
        return
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def find(url: str) -> Path | None:
    """The data directory of the live local stack serving ``url``, or None."""
    port = _port_of(url)
    if port is None:
        return None
    try:
        entry = json.loads(_entry(port).read_text())
        pid, data = int(entry["pid"]), Path(entry["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # the same process, not another that got its pid since (it would be handed the
    # admin's password)
    if not _alive(pid) or entry.get("started") != _started(pid):
        return None
    return data


def _started(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (None where /proc has no
    such field): a pid and this are one process for the life of the machine."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not our stack
        return False
    return True
