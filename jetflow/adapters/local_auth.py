"""The credentials of the services ``jetflow up`` starts on its embedded nats-server: each
role's user, and a fresh identity for every worker process it starts (added to the running
server by a configuration reload), each service connecting with its own context file.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Protocol

from jetflow.adapters.auth import ENV, Credentials
from jetflow.adapters.credentials import (
    CONTEXTS_DIR,
    contexts,
    ensure_users,
    stored_users,
)
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core.roles import User, authorization_block

__all__ = ["LocalAuth"]


class _Started(Protocol):
    name: str
    env: dict[str, str]


class LocalAuth:
    """Per-role users on ``server`` (anonymous connections: submitters)."""

    def __init__(self, data_dir: Path, server: EmbeddedServer) -> None:
        self.data_dir, self.server = data_dir, server
        self.users: list[User] = []
        self.workers: dict[str, str] = {}  # service name -> its current worker id

    def prepare(self) -> None:
        """Before the server starts: the users (workers of an earlier run forgotten)."""
        earlier = [u.worker_id for u in stored_users(self.data_dir) if u.worker_id]
        self.users = ensure_users(self.data_dir, forget=earlier)
        self.server.extra = authorization_block(self.users)

    def started(self) -> None:
        """Once the server listens (its port known): the context files."""
        contexts(self.data_dir, self.server.url, self.users)

    def credentials(self, role: str) -> Credentials:
        return Credentials(context=str(self._context(role))).with_context()

    def env(self, role: str) -> dict[str, str]:
        """A service's environment: its context, and no other credentials."""
        return {**{var: "" for var in ENV.values()}, ENV["context"]: str(self._context(role))}

    async def new_worker(self, svc: _Started) -> None:
        """Before a worker process starts: a new worker id with its own user (the previous
        process's removed), the server reloaded to know it, the service's environment."""
        old = self.workers.get(svc.name)
        worker_id = f"{svc.name}-{secrets.token_hex(4)}"
        self.users = ensure_users(self.data_dir, [worker_id],
                                  forget=[old] if old else [])
        await self.server.reload(authorization_block(self.users))
        user = next(u for u in self.users if u.worker_id == worker_id)
        contexts(self.data_dir, self.server.url, [user])
        self.workers[svc.name] = worker_id
        svc.env.update({**self.env(user.name), "JETFLOW_WORKER_ID": worker_id})

    def _context(self, name: str) -> Path:
        return self.data_dir / CONTEXTS_DIR / f"{name}.json"
