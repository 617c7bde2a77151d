"""Setting up a NATS server or cluster that ``jetflow up`` does not start: ``jetflow
credentials DIR`` makes the roles' credentials, ``jetflow init`` (as admin) the streams and
object stores.

It writes what ``up`` makes for its own server (:mod:`jetflow.adapters.credentials`): one
user per role and per named worker in ``DIR/credentials.json``, a nats CLI context per user
in ``DIR/contexts/``, and the server's side, ``DIR/authorization.conf``, for the cluster's
configuration to ``include``. Run again, it keeps every password and adds new workers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jetflow.cli.options import CommandError, common_options

__all__ = ["add_commands"]

AUTH_FILE = "authorization.conf"


async def cmd_credentials(a: argparse.Namespace) -> int:
    from jetflow.adapters.bus import check_url
    from jetflow.adapters.credentials import contexts, ensure_users, write_private
    from jetflow.core import subjects as S
    from jetflow.core.roles import authorization_block

    out = Path(a.dir).resolve()
    try:
        workers = [S.check_token(w, "worker id") for w in a.worker]
        check_url(a.url)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if a.tls_ca and not Path(a.tls_ca).is_file():
        raise CommandError(f"--tls-ca {a.tls_ca}: no such file")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    users = ensure_users(out, workers)
    tls = {"ca": str(Path(a.tls_ca).resolve())} if a.tls_ca else None
    written = contexts(out, a.url, users, tls)
    write_private(out / AUTH_FILE, authorization_block(
        users, anonymous=None if a.no_anonymous else "submitter"))
    print(f"credentials for {a.url}: {len(users)} users in {out / 'credentials.json'}")
    print(f"  server: copy {out / AUTH_FILE} next to each nats-server's configuration file "
          f"and add `include {AUTH_FILE}` to it (nats-server takes include paths relative "
          "to that file), then reload it")
    for name, path in sorted(written.items()):
        print(f"  {name:<24} {path}")
    print("  each role on its machine: `jetflow sentinel --context contexts/sentinel.json`,"
          " `jetflow worker --id ID --context contexts/worker-ID.json`, ...")
    return 0


async def cmd_init(a: argparse.Namespace) -> int:
    from jetflow.adapters.bus import connect, ensure_buckets, ensure_streams
    from jetflow.core import subjects as S

    if a.replicas < 1:
        raise CommandError("--replicas must be at least 1")
    nc = await connect(a.nats)
    try:
        js = nc.jetstream()
        await ensure_streams(js, replicas=a.replicas)
        await ensure_buckets(js, replicas=a.replicas)
        names = [S.EVENTS_STREAM, S.SUBMIT_STREAM, S.HEARTBEAT_STREAM, S.LOGS_STREAM]
        for name in names:
            info = await js.stream_info(name)
            print(f"  {name:<14} {info.config.num_replicas or 1} replica(s), "
                  f"{info.state.messages:,} messages")
    finally:
        await nc.close()
    print(f"jetflow's streams and object stores are ready on {a.nats or 'the server'}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "init", help="create jetflow's streams and object stores (admin; a cluster's once)",
        description="Create (or check) the JetStream streams and object stores jetflow "
                    "uses, with --replicas copies each: what `jetflow up` does for its own "
                    "server, and what an admin runs once on a cluster, since no other "
                    "role may create streams.")
    common_options(p)
    p.add_argument("--replicas", type=int, default=1,
                   help="copies of each stream (3 on a 3-node cluster; default 1)")
    p.set_defaults(run=cmd_init)

    p = sub.add_parser(
        "credentials", help="make the roles' credentials for a NATS server or cluster",
        description="Write one NATS user per role (submitter, operator, sentinel, "
                    "projector, admin) and per --worker, a nats CLI context per user, and "
                    "the server's authorization block (DIR/authorization.conf), for "
                    "running each role on its own machine against a server `jetflow up` "
                    "does not start. Files are 0600; run again to add workers (passwords "
                    "are kept).")
    p.add_argument("dir", help="where to write them (keep it private)")
    p.add_argument("--url", required=True,
                   help="the server URL(s) the contexts name, e.g. "
                        "nats://n1:4222,nats://n2:4222")
    p.add_argument("--worker", action="append", default=[], metavar="ID",
                   help="a worker id to make an identity for (repeatable)")
    p.add_argument("--tls-ca", help="the CA file the contexts trust (a TLS cluster)")
    p.add_argument("--no-anonymous", action="store_true",
                   help="refuse connections without credentials (by default they are "
                        "submitters)")
    p.set_defaults(run=cmd_credentials)
