"""Which projection file a read command reads: ``--db``; else ``<data>/projections.sqlite``
when ``--data`` was given or that file is here; else the file of the projector running
on this machine, which answers ``jf.ctl.projector.where`` over NATS. So a read command
run in another directory than ``jetflow up`` reads the same projection, and one that
finds none says where to look instead of advising a second stack."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

import orjson

from jetflow.adapters.bus import BusError, Refused, connect, default_url
from jetflow.cli.options import DEFAULT_DATA, PROJECTION_FILE
from jetflow.core import subjects as S
from jetflow.projections.schema import ProjectionError

__all__ = ["projection_path", "ask_projector", "local_path"]

ASK_WAIT_S = 0.5  # how long a read command waits for a projector to say where it is


def local_path(a: argparse.Namespace) -> Path:
    """``--db``, else ``<--data or ./.jetflow>/projections.sqlite``."""
    if a.db:
        return Path(a.db)
    return Path(a.data or DEFAULT_DATA) / PROJECTION_FILE


async def projection_path(a: argparse.Namespace, *, required: bool = True) -> Path | None:
    """The file to read (see the module docstring). When there is none: a
    :class:`ProjectionError` naming ``--db``/``--data`` and what a running projector
    said, or None if not ``required``."""
    here = local_path(a)
    if a.db or a.data or here.exists():
        return here
    answer = await ask_projector(a.nats)
    if answer is not None and _readable_here(answer):
        return Path(answer["db"])
    if not required:
        return None
    raise ProjectionError(_nothing_found(here, a.nats, answer))


async def ask_projector(url: str | None) -> dict[str, Any] | None:
    """What the first projector to answer says of its file, or None (no server, no
    projector, an answer that is no object)."""
    try:
        nc = await connect(url, name="jetflow-read", wait_s=ASK_WAIT_S)
    except Refused:
        raise  # wrong credentials: say so, not that nothing was found
    except (BusError, OSError):
        return None
    try:
        reply = await nc.request(S.PROJECTOR_WHERE, b"", timeout=ASK_WAIT_S)
        answer = orjson.loads(reply.data)
    except Exception:  # noqa: BLE001 - no projector (no responders, a timeout) or nonsense
        return None
    finally:
        await nc.close()
    return answer if isinstance(answer, dict) and isinstance(answer.get("db"), str) else None


def _readable_here(answer: dict[str, Any]) -> bool:
    return answer.get("host") == socket.gethostname() and Path(answer["db"]).is_file()


def _nothing_found(here: Path, url: str | None, answer: dict[str, Any] | None) -> str:
    if answer is None:
        return (f"no projection at {here}, and no projector answered at "
                f"{url or default_url()}: pass --db FILE, or --data DIR (the directory "
                "`jetflow up` or `jetflow projector` keeps it in)")
    return (f"no projection at {here}; the running projector (pid {answer.get('pid')} on "
            f"{answer.get('host')}) keeps its file at {answer['db']}, which is not readable "
            "on this machine: run the command there, or pass --db FILE")
