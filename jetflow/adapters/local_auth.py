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
from jetflow.adapters.tls import TlsFiles, ensure_tls
from jetflow.core.roles import User, authorization_block

__all__ = ["LocalAuth"]


class _Started(Protocol):
    name: str
    env: dict[str, str]


class LocalAuth:
    """Per-role users on ``server`` (anonymous connections: submitters)."""

    def __init__(self, data_dir: Path, server: EmbeddedServer, *,
                 tls: bool | TlsFiles = False) -> None:
        self.data_dir, self.server = data_dir, server
        # served, and trusted by the contexts: given, or made under <data>/tls/
        self.tls = tls if isinstance(tls, TlsFiles) else ensure_tls(data_dir) if tls else None
        self.users: list[User] = []
        self.workers: dict[str, str] = {}  # service name -> its current worker id

    def prepare(self) -> None:
        """Before the server starts: the users (workers of an earlier run forgotten)."""
        earlier = [u.worker_id for u in stored_users(self.data_dir) if u.worker_id]
        self.users = ensure_users(self.data_dir, forget=earlier)
        self.server.extra = self._conf()

    def _conf(self) -> str:
        """The server configuration of the users (and the certificate, with TLS)."""
        return authorization_block(self.users) + (self.tls.server_block() if self.tls
                                                  else "")

    def _contexts(self, users: list[User]) -> None:
        contexts(self.data_dir, self.server.url, users,
                 {"ca": str(self.tls.ca)} if self.tls else None)

    def started(self) -> None:
        """Once the server listens (its port known): the context files."""
        self._contexts(self.users)

    def credentials(self, role: str) -> Credentials:
        return Credentials(context=str(self.context_of(role))).with_context()

    def env(self, role: str) -> dict[str, str]:
        """A service's environment: its context, and no other credentials."""
        return {**{var: "" for var in ENV.values()}, ENV["context"]: str(self.context_of(role))}

    async def new_worker(self, svc: _Started) -> None:
        """Before a worker process starts: a new worker id with its own user (the previous
        process's removed), the server reloaded to know it, the service's environment."""
        old = self.workers.get(svc.name)
        worker_id = f"{svc.name}-{secrets.token_hex(4)}"
        user_name = await self.add_worker(worker_id, forget=old)
        self.workers[svc.name] = worker_id
        svc.env.update({**self.env(user_name), "JETFLOW_WORKER_ID": worker_id})

    async def add_worker(self, worker_id: str, forget: str | None = None) -> str:
        """A user of its own for worker ``worker_id`` (``forget``'s removed), known to the
        running server, with its context file; the user's name."""
        self.users = ensure_users(self.data_dir, [worker_id],
                                  forget=[forget] if forget else [])
        await self.server.reload(self._conf())
        user = next(u for u in self.users if u.worker_id == worker_id)
        self._contexts([user])
        return user.name

    def context_of(self, name: str) -> Path:
        """The context file of user (or role) ``name``."""
        return self.data_dir / CONTEXTS_DIR / f"{name}.json"
