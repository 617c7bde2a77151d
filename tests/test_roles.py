"""The roles' permissions as data (no server): who may append which event."""

from __future__ import annotations

import pytest

from jetflow.core import roles
from jetflow.core.roles import ROLES, User, authorization_block, matches, permissions

JOB = "jf.job.0190aaaa-bbbb"


def may(role: str, subject: str) -> bool:
    perms = permissions(role, "w1" if role == "worker" else None)
    return perms is None or perms.may_publish(subject)


def test_nats_wildcards_match_as_the_server_does() -> None:
    assert matches("jf.job.*.succeeded", "jf.job.x.succeeded")
    assert not matches("jf.job.*.succeeded", "jf.job.x.queued")
    assert not matches("jf.job.*.succeeded", "jf.job.x.y.succeeded")
    assert matches("jf.log.>", "jf.log.x.1") and not matches("jf.log.>", "jf.log")
    assert not matches("jf.job.*.succeeded", "jf.job.>")  # a pattern covers less
    assert matches("jf.>", "jf.job.>")


@pytest.mark.parametrize("event", ["queued", "retry_scheduled", "dead_lettered", "submitted",
                                   "rejected", "skipped", "cancel_requested"])
def test_only_the_sentinel_and_admin_append_decisions(event: str) -> None:
    allowed = {r for r in ROLES if may(r, f"{JOB}.{event}")}
    assert allowed == {"sentinel", "admin"}


@pytest.mark.parametrize("event", ["started", "progress", "succeeded"])
def test_only_a_worker_and_admin_append_what_a_worker_owns(event: str) -> None:
    allowed = {r for r in ROLES if may(r, f"{JOB}.{event}")}
    assert allowed == {"worker", "admin"}


def test_a_worker_acts_only_as_itself() -> None:
    me = permissions("worker", "w1")
    assert me is not None
    assert me.may_publish("jf.hb.w1") and not me.may_publish("jf.hb.w2")
    assert me.may_publish("jf.worker.w1.joined") and not me.may_publish("jf.worker.w2.joined")
    assert not me.may_publish("jf.worker.w1.lost")  # the sentinel's finding
    assert me.may_subscribe("jf.work.w1") and not me.may_subscribe("jf.work.w2")
    assert not me.may_subscribe("jf.work.>")
    with pytest.raises(ValueError, match="its own worker id"):
        permissions("worker")
    with pytest.raises(ValueError):
        permissions("worker", "w1.>")


@pytest.mark.parametrize("api", ["STREAM.DELETE.JF_EVENTS", "STREAM.PURGE.JF_EVENTS",
                                 "STREAM.UPDATE.JF_EVENTS", "STREAM.CREATE.X",
                                 "CONSUMER.DELETE.JF_SUBMIT.jf-sentinel-submit",
                                 "STREAM.MSG.DELETE.JF_EVENTS"])
def test_no_role_but_admin_changes_or_deletes_streams(api: str) -> None:
    assert {r for r in ROLES if may(r, f"$JS.API.{api}")} == {"admin"}


def test_a_submitter_creates_nothing_on_the_server() -> None:
    for role in ("submitter", "operator"):
        perms = permissions(role)
        assert perms is not None
        assert not any("CONSUMER" in p or "$O." in p or "PURGE" in p for p in perms.publish)
        assert perms.may_publish("jf.submit.default")
        assert perms.may_publish("$JS.API.DIRECT.GET.JF_EVENTS.jf.job.x.*")
    assert may("operator", "jf.ctl.cancel") and not may("submitter", "jf.ctl.cancel")


@pytest.mark.parametrize("subject", ["$O.JF_PLUGINS.C.abc", "$O.JF_TEMPLATES.M.abc",
                                     "jf.plugin.p.deployed", "jf.plugin.p.activated",
                                     "jf.wf.etl.registered"])
def test_deploys_and_registrations_are_admin_only(subject: str) -> None:
    assert {r for r in ROLES if may(r, subject)} == {"admin"}


def test_the_server_block_names_every_user_and_the_anonymous_role() -> None:
    users = [User("submitter", "s3cret", "submitter"), User("admin", "a", "admin"),
             User("worker-w1", "w", "worker", "w1")]
    block = authorization_block(users)
    assert block.startswith("authorization {") and 'no_auth_user: "submitter"' in block
    assert '"jf.hb.w1"' in block and '"jf.hb.w2"' not in block
    assert "no_auth_user" not in authorization_block(users, anonymous=None)
    with pytest.raises(ValueError, match="no user 'nobody'"):
        authorization_block(users, anonymous="nobody")
    with pytest.raises(ValueError, match="unknown role"):
        roles.permissions("root")


def test_only_the_services_delete_consumers_of_the_log() -> None:
    allowed = {r for r in ROLES if may(r, "$JS.API.CONSUMER.DELETE.JF_EVENTS.jf-projector")}
    assert allowed == {"sentinel", "projector", "admin"}
