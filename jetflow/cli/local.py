"""Credentials found by themselves: a command given none, aimed at a secured ``jetflow
up`` on this machine (:mod:`jetflow.adapters.local_stacks`), uses that stack's context
files. A service takes its own role's; ``jetflow worker`` asks ``up`` for a worker
identity of its own; ``submit`` is a submitter; every other command (cancel, retry,
plugin deploy, workflow register, the read commands...) is the admin, as the user who ran
``up`` and owns its data directory is. Credentials given by flag or environment always
win, and elsewhere nothing is found: pass ``--context FILE`` or the usual flags."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import orjson

from jetflow.adapters.auth import ENV, Credentials
from jetflow.adapters.bus import default_url
from jetflow.adapters.local_stacks import find
from jetflow.cli.options import CommandError
from jetflow.core import subjects as S

__all__ = ["find_credentials", "ROLE_OF"]

# the command -> the role whose context it takes (the rest: admin)
ROLE_OF = {"sentinel": "sentinel", "projector": "projector", "submit": "submitter"}
MINT_WAIT_S = 10.0


def find_credentials(a: argparse.Namespace) -> None:
    """Set ``JETFLOW_CONTEXT`` (and a worker's ``--id``) from the local stack serving the
    command's server, if it gave no credentials of its own."""
    if a.command in ("up", "credentials") or any(os.environ.get(var) for var in ENV.values()):
        return
    data = find(a.nats or default_url())
    if data is None:
        return
    contexts = data / "contexts"
    if a.command == "worker":
        context, worker_id = asyncio.run(_new_worker(a, contexts / "admin.json"))
        if a.id is None:
            a.id = worker_id
    else:
        context = contexts / f"{ROLE_OF.get(a.command, 'admin')}.json"
    if os.access(context, os.R_OK):
        os.environ[ENV["context"]] = str(context)


async def _new_worker(a: argparse.Namespace, admin: Path) -> tuple[Path, str]:
    """A worker identity of its own, made by the local ``up``."""
    from jetflow.adapters.bus import connect

    nc = await connect(a.nats, credentials=Credentials(context=str(admin)).with_context())
    try:
        reply = await nc.request(S.LOCAL_WORKER, orjson.dumps({"id": a.id}),
                                 timeout=MINT_WAIT_S)
    finally:
        await nc.close()
    answer = orjson.loads(reply.data)
    if "error" in answer:
        raise CommandError(f"the local `jetflow up` gave no worker identity: "
                           f"{answer['error']}")
    return Path(answer["context"]), str(answer["worker_id"])
