"""Who may publish and subscribe to what: jetflow's roles as NATS permissions, enforced by
nats-server (pure: no I/O; the server configuration is rendered by
:func:`authorization_block`).

In an event-sourced system whoever can publish to the log can rewrite history, so each
role may append only the events it owns, told apart by the subject's last token
(``jf.<kind>.<id>.<event type>``):

- ``submitter`` publishes submissions and reads the log through direct gets (which create
  nothing on the server) and core subscriptions; anonymous connections get this role.
- ``operator`` is a submitter that may also cancel and retry (``jf.ctl.>``).
- ``worker`` (one identity per worker id) receives its own offers (and the acks of the
  ``submitted`` appends of the jobs offered to it early) and appends what a
  worker owns: a claim (``started``), ``progress``, ``succeeded``, ``failed``, a
  ``timed_out`` of its own run, ``handed_back`` (a draining worker's run given back), its
  own lifecycle and heartbeats, logs, and the environments it built.
- ``sentinel`` appends the decisions (queued, retries, dead letters, cancellations,
  workflow events, lost workers) and offers work.
- ``projector`` reads the whole log through its own durable consumer.
- ``admin`` may do anything: streams, plugin deploys, template registration.

Which worker holds a job's claim is not in a subject: the services check that, by the
signature each worker puts on its events (:mod:`jetflow.core.origin`) and by the state
machine (an outcome from a worker that does not hold the claim is refused and recorded).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from jetflow.core import subjects as S

__all__ = ["ROLES", "Permissions", "User", "authorization_block", "matches", "permissions"]

ROLES = ("submitter", "operator", "worker", "sentinel", "projector", "admin")

# The events each role may append, by kind (the subject's last token).
# a worker stopping a run it was asked to cancel records it ``failed``: the sentinel then
# decides ``cancelled``
WORKER_JOB_EVENTS = ("started", "progress", "succeeded", "failed", "timed_out", "handed_back")
WORKER_SELF_EVENTS = ("joined", "left")
WORKER_PLUGIN_EVENTS = ("env_ready", "env_failed")
SENTINEL_JOB_EVENTS = ("submitted", "rejected", "queued", "retry_scheduled", "timed_out",
                       "failed", "dead_lettered", "cancel_requested", "cancelled", "skipped")
SENTINEL_WORKER_EVENTS = ("lost",)
ADMIN_ONLY_WF_EVENTS = ("registered",)
SENTINEL_WF_EVENTS = ("started", "step_failed", "cancel_requested", "succeeded", "failed",
                      "cancelled")

JS = "$JS.API"
INBOX = "_INBOX.>"
# the streams a reader reads by direct gets (the templates: to draw a workflow's steps)
READ_STREAMS = (S.EVENTS_STREAM, S.LOGS_STREAM, f"OBJ_{S.TEMPLATE_BUCKET}")


@dataclass(frozen=True)
class Permissions:
    """What one connection may publish and subscribe to (allow lists: anything else is
    refused by the server)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may answer requests made to it

    def may_publish(self, subject: str) -> bool:
        return any(matches(p, subject) for p in self.publish)

    def may_subscribe(self, subject: str) -> bool:
        return any(matches(p, subject) for p in self.subscribe)

    def to_conf(self) -> dict[str, object]:
        conf: dict[str, object] = {"publish": {"allow": list(self.publish)},
                                   "subscribe": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            conf["allow_responses"] = True
        return conf


@dataclass(frozen=True)
class User:
    """One account of the server: its name, password and role (a worker's own id)."""

    name: str
    password: str
    role: str
    worker_id: str | None = None


def matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject ``pattern`` (``*`` one token, ``>`` the rest) covers
    ``subject`` (itself a subject or a pattern: a pattern is covered when every subject it
    matches is)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]) or \
                (token == "*" and have[i] == ">"):
            return False
    return len(have) == len(want)


def _events(kind: str, types: Iterable[str], id_: str = "*") -> list[str]:
    return [f"{S.PREFIX}.{kind}.{id_}.{t}" for t in types]


def _reads() -> list[str]:
    """Publishes a reader needs: direct gets and streams' info (nothing is created)."""
    out = [f"{JS}.INFO", f"{JS}.STREAM.INFO.*", f"{JS}.STREAM.NAMES"]
    for stream in READ_STREAMS:
        out += [f"{JS}.STREAM.INFO.{stream}", f"{JS}.DIRECT.GET.{stream}",
                f"{JS}.DIRECT.GET.{stream}.>"]
    return out


def _consumes(stream: str) -> list[str]:
    """Publishes that reading ``stream`` through consumers (ephemeral or durable) needs."""
    return [f"{JS}.STREAM.INFO.{stream}", f"{JS}.CONSUMER.CREATE.{stream}",
            f"{JS}.CONSUMER.CREATE.{stream}.>", f"{JS}.CONSUMER.DURABLE.CREATE.{stream}.*",
            f"{JS}.CONSUMER.INFO.{stream}.*", f"{JS}.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>"]


def _own_consumers(stream: str) -> list[str]:
    """A service's right to delete its consumers on ``stream`` (trusted services only:
    the server cannot tell whose a consumer is)."""
    return [f"{JS}.CONSUMER.DELETE.{stream}.*"]


def _object_store(bucket: str, write: bool) -> list[str]:
    stream = f"OBJ_{bucket}"
    out = [*_consumes(stream), f"{JS}.DIRECT.GET.{stream}.>", f"{JS}.STREAM.MSG.GET.{stream}"]
    if write:
        out += [f"$O.{bucket}.C.>", f"$O.{bucket}.M.>", f"{JS}.STREAM.PURGE.{stream}"]
    return out


SUBSCRIBE_READS = (f"{S.PREFIX}.job.>", f"{S.PREFIX}.wf.>", f"{S.PREFIX}.log.>", INBOX)


def permissions(role: str, worker_id: str | None = None) -> Permissions | None:
    """The permissions of ``role`` (None for admin: everything). A worker's are for its
    own id."""
    if role == "admin":
        return None
    submitter = [*S.SUBMIT_SUBJECTS, *_reads(), S.SENTINEL_PING, S.PROJECTOR_WHERE]
    if role == "submitter":
        return Permissions(tuple(submitter), SUBSCRIBE_READS)
    if role == "operator":
        return Permissions((*submitter, f"{S.PREFIX}.ctl.>"), SUBSCRIBE_READS)
    if role == "worker":
        if worker_id is None:
            raise ValueError("a worker's permissions are for its own worker id")
        me = S.check_token(worker_id, "worker id")
        return Permissions(tuple([
            *_events("job", WORKER_JOB_EVENTS), *_events("worker", WORKER_SELF_EVENTS, me),
            *_events("plugin", WORKER_PLUGIN_EVENTS), S.heartbeat_subject(me),
            *S.LOGS_SUBJECTS, *_reads(), *_consumes(S.EVENTS_STREAM),
            *_object_store(S.PLUGIN_BUCKET, write=False), S.SENTINEL_PING]),
            (S.work_subject(me), S.work_acks_of(me), f"{S.PREFIX}.worker.{me}.>",
             f"{S.PREFIX}.job.>", f"{S.PREFIX}.plugin.>",
             f"{S.PREFIX}.ctl.>", INBOX))
    if role == "sentinel":
        return Permissions(tuple([
            *_events("job", SENTINEL_JOB_EVENTS), *_events("wf", SENTINEL_WF_EVENTS),
            *_events("worker", SENTINEL_WORKER_EVENTS), *S.WORK_SUBJECTS, *_reads(),
            *_consumes(S.EVENTS_STREAM), *_consumes(S.SUBMIT_STREAM),
            *_consumes(S.HEARTBEAT_STREAM), *_own_consumers(S.EVENTS_STREAM),
            *_own_consumers(S.HEARTBEAT_STREAM), *_object_store(S.SNAPSHOT_BUCKET, write=True),
            *_object_store(S.TEMPLATE_BUCKET, write=False), INBOX]),
            (f"{S.PREFIX}.>", INBOX), allow_responses=True)
    if role == "projector":
        return Permissions(tuple([*_reads(), *_consumes(S.EVENTS_STREAM),
                                  *_own_consumers(S.EVENTS_STREAM), INBOX]),
                           (f"{S.PREFIX}.>", INBOX), allow_responses=True)
    raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def authorization_block(users: Sequence[User], anonymous: str | None = "submitter") -> str:
    """The nats-server ``authorization`` configuration for ``users``; connections without
    credentials get the role ``anonymous`` (a user named like it must be in ``users``),
    or are refused when it is None."""
    entries = []
    for user in users:
        entry: dict[str, object] = {"user": user.name, "password": user.password}
        perms = permissions(user.role, user.worker_id)
        if perms is not None:
            entry["permissions"] = perms.to_conf()
        entries.append(entry)
    # nats-server's configuration format accepts JSON values
    block = "authorization " + json.dumps({"users": entries}, indent=2) + "\n"
    if anonymous is not None:
        if anonymous not in {u.name for u in users}:
            raise ValueError(f"no user {anonymous!r} for anonymous connections")
        block += f"no_auth_user: {json.dumps(anonymous)}\n"
    return block
