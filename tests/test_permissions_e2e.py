"""The roles, enforced by a real nats-server running the generated authorization: each
role's forbidden actions are refused by the server and leave the log unchanged; what a role
owns goes through. (A server of its own: the configuration differs from the shared one.)"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from jetflow.adapters import bus
from jetflow.adapters.auth import Credentials, CredentialsError
from jetflow.adapters.credentials import contexts, ensure_users, worker_user
from jetflow.adapters.nats_server import EmbeddedServer
from jetflow.core import subjects as S
from jetflow.core.roles import User, authorization_block
from tests.test_projections_e2e import cli

pytestmark = pytest.mark.asyncio(loop_scope="module")

JOB = "jf.job.0190aaaa-0000-7000-8000-000000000001"
BODY = json.dumps({"v": 2, "at": 1.0, "data": {"attempt": 1, "worker": "w2"}}).encode()


@dataclass
class Secured:
    url: str
    users: dict[str, User]
    contexts: dict[str, Path]
    data: Path
    admin: NATS = field(init=False)


@dataclass
class Session:
    nc: NATS
    errors: list[str]

    async def refused(self, subject: str, body: bytes = BODY) -> bool:
        """Publish ``subject``: whether the server refused it (a permissions violation)."""
        self.errors.clear()
        await self.nc.publish(subject, body)
        await self.nc.flush()
        for _ in range(100):
            if any("permissions violation" in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.01)
        return False

    async def sub_refused(self, subject: str) -> bool:
        self.errors.clear()
        sub = await self.nc.subscribe(subject)
        await self.nc.flush()
        for _ in range(100):
            if any("permissions violation" in e.lower() for e in self.errors):
                await sub.unsubscribe()
                return True
            await asyncio.sleep(0.01)
        await sub.unsubscribe()
        return False


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    data = tmp_path_factory.mktemp("secured")
    users = ensure_users(data, ["w1", "w2"])
    async with EmbeddedServer(data / "srv", port=0,
                              extra=authorization_block(users)) as srv:
        world = Secured(srv.url, {u.name: u for u in users},
                        contexts(data, srv.url, users), data)
        world.admin = await as_user(world, "admin")
        js = world.admin.jetstream()
        await bus.ensure_streams(js)
        for bucket in (S.PLUGIN_BUCKET, S.TEMPLATE_BUCKET):
            await js.create_object_store(bucket)
        try:
            yield world
        finally:
            await world.admin.close()


async def as_user(world: Secured, name: str | None) -> NATS:
    return (await session(world, name)).nc


async def session(world: Secured, name: str | None) -> Session:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    if name is None:  # anonymous: no credentials
        nc = await nats.connect(world.url, error_cb=on_error, allow_reconnect=False)
    else:
        user = world.users[name]
        nc = await nats.connect(world.url, user=user.name, password=user.password,
                                error_cb=on_error, allow_reconnect=False)
    return Session(nc, errors)


async def log_state(world: Secured) -> dict[str, tuple[int, int]]:
    js = world.admin.jetstream()
    out = {}
    for stream in (S.EVENTS_STREAM, S.SUBMIT_STREAM, S.HEARTBEAT_STREAM, "OBJ_JF_PLUGINS",
                   "OBJ_JF_TEMPLATES"):
        info = await js.stream_info(stream)
        out[stream] = (info.state.messages, info.state.last_seq)
    consumers = await js.consumers_info(S.EVENTS_STREAM)
    out["consumers"] = (len(consumers), 0)
    return out


FORBIDDEN: dict[str | None, list[str]] = {
    None: [f"{JOB}.succeeded", f"{JOB}.queued", "jf.ctl.cancel"],
    "submitter": [f"{JOB}.succeeded", f"{JOB}.queued", "jf.wf.wf1.started", "jf.hb.w1",
                  "jf.worker.w1.joined", f"{JOB}.started", "jf.ctl.cancel",
                  "$JS.API.STREAM.DELETE.JF_EVENTS", "$JS.API.STREAM.PURGE.JF_EVENTS",
                  "$JS.API.CONSUMER.CREATE.JF_EVENTS",
                  "$JS.API.CONSUMER.DELETE.JF_SUBMIT.jf-sentinel-submit",
                  "$O.JF_PLUGINS.C.forged", "jf.plugin.p.deployed",
                  "$O.JF_TEMPLATES.C.forged", "jf.wf.etl.registered"],
    "operator": [f"{JOB}.succeeded", f"{JOB}.cancelled", "$JS.API.STREAM.DELETE.JF_EVENTS"],
    "worker-w1": [f"{JOB}.queued", f"{JOB}.dead_lettered", f"{JOB}.retry_scheduled",
                  f"{JOB}.submitted", "jf.wf.wf1.started", "jf.hb.w2",
                  "jf.worker.w2.joined", "jf.worker.w1.lost",
                  "$JS.API.STREAM.DELETE.JF_EVENTS", "$JS.API.STREAM.PURGE.JF_EVENTS",
                  "$JS.API.CONSUMER.DELETE.JF_SUBMIT.jf-sentinel-submit",
                  "$O.JF_PLUGINS.C.forged", "jf.plugin.p.deployed",
                  "jf.wf.etl.registered", "jf.work.w2"],
    "sentinel": [f"{JOB}.succeeded", f"{JOB}.started", f"{JOB}.progress", "jf.hb.w1",
                 "jf.worker.w1.joined", "$JS.API.STREAM.DELETE.JF_EVENTS",
                 "$O.JF_PLUGINS.C.forged", "jf.plugin.p.deployed", "jf.wf.etl.registered"],
    "projector": [f"{JOB}.succeeded", f"{JOB}.queued", "jf.hb.w1",
                  "$JS.API.STREAM.DELETE.JF_EVENTS", "$JS.API.STREAM.PURGE.JF_EVENTS",
                  "jf.ctl.cancel"],
}


# The list of forbidden actions, tried by every role that does not own one: a
# forged outcome and decision, a workflow event, another worker's heartbeat, deleting or
# purging a stream, deleting a consumer, deploying a plugin, registering a template,
# cancelling. (A claim as another worker is a `started` a worker may append: the origin
# check refuses it, tests/test_origin_e2e.py.)
EVERY_ROLE_TRIES = [f"{JOB}.succeeded", f"{JOB}.queued", "jf.wf.wf1.succeeded", "jf.hb.w2",
                    "$JS.API.STREAM.DELETE.JF_EVENTS", "$JS.API.STREAM.PURGE.JF_EVENTS",
                    "$JS.API.STREAM.PURGE.JF_SUBMIT", "$JS.API.STREAM.MSG.DELETE.JF_EVENTS",
                    "$JS.API.STREAM.UPDATE.JF_EVENTS",
                    "$JS.API.CONSUMER.DELETE.JF_SUBMIT.jf-sentinel-submit",
                    "$O.JF_PLUGINS.C.forged", "jf.plugin.p.deployed",
                    "$O.JF_TEMPLATES.C.forged", "jf.wf.etl.registered", "jf.ctl.cancel"]
OWNS = {"operator": {"jf.ctl.cancel"}, "worker-w1": {f"{JOB}.succeeded"},
        "sentinel": {f"{JOB}.queued", "jf.wf.wf1.succeeded"}}
for _role, _tried in FORBIDDEN.items():
    _tried += [s for s in EVERY_ROLE_TRIES
               if s not in OWNS.get(_role or "", set()) and s not in _tried]


@pytest.mark.parametrize("role", list(FORBIDDEN), ids=lambda r: r or "anonymous")
async def test_each_role_is_refused_what_it_does_not_own(secured: Secured,
                                                         role: str | None) -> None:
    before = await log_state(secured)
    me = await session(secured, role)
    try:
        let_through = [s for s in FORBIDDEN[role] if not await me.refused(s)]
    finally:
        await me.nc.close()
    assert let_through == []
    assert await log_state(secured) == before  # the log is unchanged


async def test_a_worker_cannot_take_another_workers_offers(secured: Secured) -> None:
    me = await session(secured, worker_user("w1"))
    try:
        assert await me.sub_refused(S.work_subject("w2"))
        assert await me.sub_refused("jf.work.>")
        assert not await me.sub_refused(S.work_subject("w1"))
        # the acks of early offers' appends: its own, not another's
        assert await me.sub_refused(S.work_acks_of("w2"))
        assert not await me.sub_refused(S.work_acks_of("w1"))
        assert await me.refused(f"{S.work_ack_prefix('w1', 's1')}.1")  # nor forge one
    finally:
        await me.nc.close()


async def test_what_a_role_owns_goes_through(secured: Secured) -> None:
    for role in ("submitter", None):  # submissions: stored without an ack (see bus)
        before = (await log_state(secured))[S.SUBMIT_STREAM]
        nc = await as_user(secured, role)
        try:
            await nc.publish("jf.submit.default", b'{"handler": "echo"}')
            await nc.flush()
        finally:
            await nc.close()
        await asyncio.sleep(0.05)
        assert (await log_state(secured))[S.SUBMIT_STREAM][1] == before[1] + 1
    owned = {"worker-w1": f"{JOB}.succeeded", "sentinel": f"{JOB}.queued"}
    for name, subject in owned.items():
        nc = await as_user(secured, name)
        try:
            ack = await nc.jetstream().publish(subject, BODY)
            assert ack.seq > 0, (name, subject)
        finally:
            await nc.close()
    me = await session(secured, worker_user("w1"))
    try:
        assert not await me.refused(S.heartbeat_subject("w1"), b"{}")
    finally:
        await me.nc.close()


async def test_a_submitter_reads_history_without_creating_anything(secured: Secured) -> None:
    nc = await as_user(secured, "submitter")
    try:
        consumers = len(await secured.admin.jetstream().consumers_info(S.EVENTS_STREAM))
        msg = await nc.jetstream().get_last_msg(S.EVENTS_STREAM, f"{JOB}.*", direct=True)
        assert msg.subject.startswith(JOB)
        info = await nc.jetstream().stream_info(S.EVENTS_STREAM)
        assert info.state.messages >= 1
        assert len(await secured.admin.jetstream().consumers_info(S.EVENTS_STREAM)) == \
            consumers
    finally:
        await nc.close()


async def test_admin_may_do_anything(secured: Secured) -> None:
    js = secured.admin.jetstream()
    await js.add_stream(StreamConfig(name="SCRATCH", subjects=["scratch.>"]))
    assert await js.delete_stream("SCRATCH")


async def test_credentials_and_contexts_are_private_and_usable(secured: Secured) -> None:
    for path in [secured.data / "credentials.json", *secured.contexts.values(),
                 secured.data / "srv" / "nats.conf"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert set(secured.contexts) >= {"submitter", "operator", "sentinel", "projector",
                                     "admin", "worker-w1", "worker-w2"}
    ctx = json.loads(secured.contexts["operator"].read_text())
    assert ctx["url"] == secured.url and ctx["user"] == "operator"
    nc = await nats.connect(ctx["url"], user=ctx["user"], password=ctx["password"])
    await nc.close()
    again = {u.name: u.password for u in ensure_users(secured.data, ["w1", "w3"])}
    assert again["admin"] == secured.users["admin"].password  # kept, not regenerated
    assert "worker-w3" in again


async def test_commands_take_credentials_and_never_show_the_secret(secured: Secured) -> None:
    admin = secured.contexts["admin"]
    code, out, err = await cli(secured.url, "--context", str(admin), "plugin", "list")
    assert code == 0, err
    secret = "wrong-" + secured.users["admin"].password[:6]
    env = {**os.environ, "JETFLOW_USER": "admin", "JETFLOW_PASSWORD": secret}
    code, out, err = await cli(secured.url, "plugin", "list", env=env)
    assert code == 1 and "user admin" in err, err  # refused (or reset: the same refusal)
    assert secret not in out + err
    code, out, err = await cli(secured.url, "submit", "--help", env=env)
    assert code == 0 and "--password" in out and secret not in out + err
    code, out, err = await cli(secured.url, "--context", str(secured.data / "none.json"),
                               "plugin", "list")
    assert code == 1 and "context file" in err and "not found" in err


async def test_the_client_connects_with_credentials(secured: Secured) -> None:
    creds = Credentials(context=str(secured.contexts["worker-w1"])).with_context()
    assert creds.url == secured.url
    assert secured.users["worker-w1"].password not in repr(creds)
    assert creds.describe() == "user worker-w1"
    nc = await bus.connect(None, credentials=creds)
    try:
        assert nc.is_connected
    finally:
        await nc.close()
    with pytest.raises(CredentialsError, match="nkey seed file /nope not found"):
        Credentials(nkey="/nope").connect_options()
