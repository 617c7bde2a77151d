"""The credentials of a local jetflow: one NATS user per role (and per worker), generated
once under ``<data>/``, and a nats CLI context file per role.

``<data>/credentials.json`` (0600) holds the users (name, a random password, role, and a
worker's id) and the origin secret of :mod:`jetflow.core.origin`: the sentinel's,
projector's and admin's contexts carry it (``jetflow_origin_secret``), a worker's context
its own signing key (``jetflow_signing_key``); the nats CLI ignores both.
:func:`contexts` writes ``<data>/contexts/<role>.json`` (0600) in the nats
CLI's context format (``url``, ``user``, ``password``), so ``nats --context FILE`` and
jetflow's ``--context FILE`` both work. The server's side is
:func:`jetflow.core.roles.authorization_block` of the same users.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jetflow.core import subjects as S
from jetflow.core.origin import worker_key
from jetflow.core.roles import ROLES, User

__all__ = ["CREDENTIALS_FILE", "CONTEXTS_DIR", "contexts", "ensure_users", "origin_secret",
           "stored_users", "worker_user", "write_private"]

CREDENTIALS_FILE = "credentials.json"
CONTEXTS_DIR = "contexts"
PASSWORD_BYTES = 24
SECRET_HOLDERS = ("sentinel", "projector", "admin")  # check every worker's signature


def worker_user(worker_id: str) -> str:
    """The user name of worker ``worker_id``'s own identity."""
    return f"worker-{S.check_token(worker_id, 'worker id')}"


def ensure_users(data_dir: Path, worker_ids: Iterable[str] = (), *,
                 forget: Iterable[str] = ()) -> list[User]:
    """The users stored under ``data_dir`` (made on first use): one per role, and one per
    worker id in ``worker_ids`` (added when new; existing passwords are kept); the worker
    ids in ``forget`` (workers that ended) are removed, with their context files."""
    path = data_dir / CREDENTIALS_FILE
    users = {user.name: user for user in stored_users(data_dir)}
    secret = _stored(data_dir).get("origin_secret") or secrets.token_hex(32)
    changed = not path.exists() or "origin_secret" not in _stored(data_dir)
    for gone in forget:
        user_name = worker_user(gone)
        if users.pop(user_name, None) is not None:
            changed = True
        (data_dir / CONTEXTS_DIR / f"{user_name}.json").unlink(missing_ok=True)
    wanted: list[tuple[str, str, str | None]] = [
        (role, role, None) for role in ROLES if role != "worker"]
    wanted += [(worker_user(w), "worker", w) for w in worker_ids]
    for name, role, worker_id in wanted:
        if name not in users:
            users[name] = User(name, secrets.token_urlsafe(PASSWORD_BYTES), role, worker_id)
            changed = True
    if changed:
        write_private(path, json.dumps({"origin_secret": secret,
                                         "users": [asdict(u) for u in users.values()]},
                                        indent=2))
    return list(users.values())


def stored_users(data_dir: Path) -> list[User]:
    """The users stored under ``data_dir`` (none before the first :func:`ensure_users`)."""
    return [User(**entry) for entry in _stored(data_dir).get("users", [])]


def origin_secret(data_dir: Path) -> bytes:
    """The origin secret stored under ``data_dir`` (made by :func:`ensure_users`)."""
    return bytes.fromhex(_stored(data_dir)["origin_secret"])


def _stored(data_dir: Path) -> dict[str, Any]:
    path = data_dir / CREDENTIALS_FILE
    if not path.exists():
        return {}
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def contexts(data_dir: Path, url: str, users: Iterable[User],
             tls: dict[str, str] | None = None) -> dict[str, Path]:
    """A nats CLI context file per user, ``<data>/contexts/<user name>.json`` (with
    ``tls``: its ``ca``, ``cert``, ``key``); the paths by user name."""
    tls = tls or {}
    directory = data_dir / CONTEXTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    out: dict[str, Path] = {}
    secret = origin_secret(data_dir)
    for user in users:
        path = directory / f"{user.name}.json"
        doc = {"description": f"jetflow {user.role}" + (f" {user.worker_id}"
                                                        if user.worker_id else ""),
               "url": url, "user": user.name, "password": user.password, **tls}
        if user.role in SECRET_HOLDERS:
            doc["jetflow_origin_secret"] = secret.hex()
        elif user.worker_id:
            doc["jetflow_signing_key"] = worker_key(secret, user.worker_id).hex()
        write_private(path, json.dumps(doc, indent=2))
        out[user.name] = path
    return out


def write_private(path: Path, content: str | bytes) -> None:
    """``content`` into ``path`` (text ended by a newline, bytes as they are), readable by
    its owner only, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = content if isinstance(content, bytes) else (content + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
