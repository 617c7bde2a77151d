"""How a jetflow process proves who it is to NATS, the NATS way: user and password, a
token, an nkey seed, a ``.creds`` file, TLS (CA, client certificate and key), or a nats CLI
context file holding any of these.

Each comes from a command's flags or from the environment (``JETFLOW_CONTEXT``,
``JETFLOW_USER``, ``JETFLOW_PASSWORD``, ``JETFLOW_TOKEN``, ``JETFLOW_NKEY``,
``JETFLOW_CREDS``, ``JETFLOW_TLS_CA``, ``JETFLOW_TLS_CERT``, ``JETFLOW_TLS_KEY``); a flag
wins over the environment, and both over the context file. Secrets never appear in a
``repr``, a log line or an error: :meth:`Credentials.describe` says which kind is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jetflow.core.origin import Origin

__all__ = ["Credentials", "CredentialsError", "ENV", "local_origin"]

# field -> environment variable
ENV = {"context": "JETFLOW_CONTEXT", "user": "JETFLOW_USER", "password": "JETFLOW_PASSWORD",
       "token": "JETFLOW_TOKEN", "nkey": "JETFLOW_NKEY", "creds": "JETFLOW_CREDS",
       "ca": "JETFLOW_TLS_CA", "cert": "JETFLOW_TLS_CERT", "key": "JETFLOW_TLS_KEY",
       # not NATS credentials: the keys of the origin check (jetflow.core.origin)
       "origin_secret": "JETFLOW_ORIGIN_SECRET", "signing_key": "JETFLOW_SIGNING_KEY"}
# the nats CLI context's keys for the same
CONTEXT_KEYS = {"user": "user", "password": "password", "token": "token", "nkey": "nkey",
                "creds": "creds", "ca": "ca", "cert": "cert", "key": "key",
                "origin_secret": "jetflow_origin_secret", "signing_key": "jetflow_signing_key"}


class CredentialsError(ValueError):
    """Credentials that cannot be used (a missing file, a context that is no JSON)."""


@dataclass(frozen=True)
class Credentials:
    """What a connection authenticates with (every field optional)."""

    context: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey: str | None = None  # a file holding an nkey seed
    creds: str | None = None  # a .creds file (JWT and seed)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    url: str | None = None  # a context's server URL, used when none is given
    # hex: the sentinel's and projector's secret, a worker's own key (core.origin)
    origin_secret: str | None = field(default=None, repr=False)
    signing_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **flags: str | None
                 ) -> Credentials:
        """Flags (those not None) over the environment over the context file."""
        given = {name: environ.get(var) or None for name, var in ENV.items()}
        given.update({k: v for k, v in flags.items() if v is not None})
        own = cls(**{k: v for k, v in given.items() if k in ENV})
        return own.with_context()

    def with_context(self) -> Credentials:
        """These credentials completed by the context file's (their own values win)."""
        if not self.context:
            return self
        path = Path(self.context).expanduser()
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise CredentialsError(f"context file {path} not found") from None
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"context file {path} cannot be read as a nats "
                                   f"context: {type(exc).__name__}") from None
        if not isinstance(doc, dict):
            raise CredentialsError(f"context file {path} is no JSON object")
        found = {ours: str(doc[theirs]) for ours, theirs in CONTEXT_KEYS.items()
                 if doc.get(theirs)}
        merged = {**found, **{k: v for k, v in dataclasses.asdict(self).items()
                              if v is not None}}
        if doc.get("url") and not self.url:
            merged["url"] = str(doc["url"])
        return Credentials(**merged)

    def describe(self) -> str:
        """Which credentials these are, with no secret in it."""
        kinds = [k for k in ("user", "token", "nkey", "creds") if getattr(self, k)]
        text = ", ".join(f"user {self.user}" if k == "user" else k for k in kinds)
        if self.ca or self.cert:
            text += (", " if text else "") + "TLS"
        return text or "no credentials"

    def connect_options(self) -> dict[str, Any]:
        """nats-py ``connect`` keyword arguments for these credentials."""
        opts: dict[str, Any] = {}
        if self.user:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.token:
            opts["token"] = self.token
        if self.nkey:
            opts["nkeys_seed"] = _existing(self.nkey, "nkey seed")
        if self.creds:
            opts["user_credentials"] = _existing(self.creds, "creds")
        if self.ca or self.cert:
            opts["tls"] = self.tls_context()
        return opts

    def secret_bytes(self) -> bytes | None:
        """The origin secret (sentinel, projector), or None: nothing is checked."""
        return _hex(self.origin_secret, "origin secret")

    def key_bytes(self) -> bytes | None:
        """A worker's signing key, or None: its events are not signed."""
        return _hex(self.signing_key, "signing key")

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(
            cafile=_existing(self.ca, "TLS CA") if self.ca else None)
        if self.cert:
            ctx.load_cert_chain(_existing(self.cert, "TLS certificate"),
                                _existing(self.key, "TLS key") if self.key else None)
        return ctx


def local_origin() -> Origin:
    """The origin check of this process's credentials (none without an origin secret)."""
    return Origin(Credentials.from_env().secret_bytes())


def _hex(value: str | None, what: str) -> bytes | None:
    if not value:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise CredentialsError(f"the {what} is not hexadecimal") from None


def _existing(path: str | None, what: str) -> str:
    if not path or not Path(path).expanduser().is_file():
        raise CredentialsError(f"{what} file {path} not found")
    return str(Path(path).expanduser())
