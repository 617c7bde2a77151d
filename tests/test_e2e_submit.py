"""Submitting: the Python API, the CLI, raw NATS; and every kind of bad submission."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from jetflow import Client, SubmissionRejected
from jetflow.core import subjects as S
from jetflow.core.submission import MAX_SUBMISSION_BYTES, derive_job_id
from tests.conftest import StackFactory, read_log, url_of
from tests.test_projections_e2e import caught_up, query
from tests.test_stream_reading import raw_publish

JETFLOW = str(Path(sys.executable).with_name("jetflow"))


def jetflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([JETFLOW, *args], capture_output=True, text=True, timeout=60)


async def test_three_submission_paths(make_stack: StackFactory, client: Client) -> None:
    stack = await make_stack(workers=1)
    url = stack.url

    api_id = await client.submit("echo", {"via": "api"}, priority=5, max_attempts=2)
    job = await client.wait(api_id, timeout=30)
    assert (job.state, job.result, job.priority, job.max_attempts) == \
        ("succeeded", {"via": "api"}, 5, 2)

    out = await asyncio.to_thread(jetflow, "submit", "echo", "--args", '{"via": "cli"}',
                                  "--wait", "--json", "--nats", url)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert (cli["state"], cli["result"]) == ("succeeded", {"via": "cli"})

    await client.nc.publish(S.submit_subject("default"), b'{"handler":"echo","args":{"x":1}}',
                            headers={S.HDR_MSG_ID: "order-42"})
    raw_id = derive_job_id("order-42", "", 0)
    assert (await client.wait(raw_id, timeout=30)).result == {"x": 1}

    reply = await client.nc.request(S.submit_subject("default"), b'{"handler":"echo"}', 10)
    req_id = orjson.loads(reply.data)["job_id"]
    assert (await client.wait(req_id, timeout=30)).state == "succeeded"

    shown = await asyncio.to_thread(jetflow, "job", api_id, "--json", "--nats", url)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert {"job_id", "state", "attempt", "handler", "queue", "priority", "result", "error",
            "events"} <= doc.keys()
    assert [e["type"] for e in doc["events"]] == ["submitted", "started", "succeeded"]
    assert all({"seq", "type", "at", "data"} <= e.keys() for e in doc["events"])


async def test_cli_exit_codes(make_stack: StackFactory) -> None:
    stack = await make_stack(workers=1)
    failed = await asyncio.to_thread(jetflow, "submit", "fail", "--args", '{"permanent": true}',
                                     "--wait", "--nats", stack.url)
    assert failed.returncode == 1 and "dead_lettered" in failed.stdout
    rejected = await asyncio.to_thread(jetflow, "submit", "nope", "--nats", stack.url)
    assert rejected.returncode == 2 and "unknown handler 'nope'" in rejected.stderr
    bad_args = await asyncio.to_thread(jetflow, "submit", "echo", "--args", "{x", "--nats",
                                       stack.url)
    assert bad_args.returncode != 0 and "not valid JSON" in bad_args.stderr
    missing = await asyncio.to_thread(jetflow, "job", "no-such-job", "--nats", stack.url)
    assert missing.returncode == 1 and "no job" in missing.stderr
    # --json: stdout is JSON whatever happens
    rejected = await asyncio.to_thread(jetflow, "submit", "nope", "--json", "--nats", stack.url)
    assert rejected.returncode == 2 and rejected.stderr == ""
    assert json.loads(rejected.stdout)["rejected"]["code"] == "unknown_handler"
    queued = await asyncio.to_thread(jetflow, "submit", "echo", "--json", "--nats", stack.url)
    assert queued.returncode == 0 and json.loads(queued.stdout)["job_id"].startswith("j")


async def test_duplicate_job_id_is_one_job(make_stack: StackFactory, client: Client) -> None:
    await make_stack(workers=1)
    first = await client.submit("echo", {"n": 1}, job_id="same-id")
    second = await client.submit("echo", {"n": 2}, job_id="same-id")
    assert first == second == "same-id"
    job = await client.wait("same-id", timeout=30)
    assert job.result == {"n": 1}
    submitted = [e for e in await client.history("same-id") if e.type == "submitted"]
    assert len(submitted) == 1


BAD = {
    "invalid_json": b'{"handler": "echo",',
    "not_object": b'["echo"]',
    "missing_field": b'{"args": {}}',
    "unknown_handler": b'{"handler": "no_such_handler"}',
    "bad_field": b'{"handler": "echo", "priority": "high"}',
    "unknown_field": b'{"handler": "echo", "colour": "red"}',
    "too_large": b'{"handler": "echo", "args": {"pad": "' + b"x" * MAX_SUBMISSION_BYTES
                 + b'"}}',
}
BAD_IDS = ["a.b", "a*", "a>", "has space", "x" * 65]


async def test_every_bad_submission_is_rejected_with_a_reason(
        make_stack: StackFactory, client: Client) -> None:
    await make_stack(workers=1)
    for code, body in BAD.items():
        reply = orjson.loads((await client.nc.request("jf.submit.default", body, 10)).data)
        assert reply.get("code") == code, (code, reply)
        assert reply["error"]
    for bad_id in BAD_IDS:
        body = orjson.dumps({"handler": "echo", "job_id": bad_id})
        reply = orjson.loads((await client.nc.request("jf.submit.default", body, 10)).data)
        assert reply.get("code") == "bad_job_id", (bad_id, reply)
    # fire-and-forget publishes of the same garbage must not stall anything either
    for body in BAD.values():
        await client.nc.publish("jf.submit.default", body)
    with pytest.raises(SubmissionRejected) as exc:
        await client.submit("echo", {}, priority=10)
    assert exc.value.code == "bad_field"
    good = await client.submit("echo", {"still": "alive"})
    assert (await client.wait(good, timeout=30)).state == "succeeded"
    rejected = await read_log(url_of(client), ["jf.job.*.rejected"])
    codes = [e.data["code"] for e in rejected]
    for code in BAD:
        # once via request, once via publish (and bad_field once more via the client)
        assert codes.count(code) == (3 if code == "bad_field" else 2), (code, codes)
    assert codes.count("bad_job_id") == len(BAD_IDS)
    assert all(e.data["reason"] and "body" in e.data for e in rejected)



async def test_subjects_that_are_not_utf8_stall_nothing(make_stack: StackFactory,
                                                        client: Client) -> None:
    """Any client can publish a subject that is not UTF-8, and the streams keep it; every
    service reads on past it (nats-py alone would drop the connection for ever)."""
    stack = await make_stack(workers=1, projector=True)
    await raw_publish(url_of(client), b"jf.submit.q\xff", b'{"handler": "echo"}')
    await raw_publish(url_of(client), b"jf.job.j\xff.succeeded", b"{}")
    good = await client.submit("echo", {"after": "garbage"})
    assert (await client.wait(good, timeout=30)).state == "succeeded"
    rejected = await read_log(url_of(client), ["jf.job.*.rejected"])
    assert [e.data["code"] for e in rejected] == ["bad_subject"], rejected
    live = stack.data_dir / "projections.sqlite"
    await caught_up(live, url_of(client))
    assert query(live, "SELECT subject, code FROM projection_errors") == [
        ("jf.job.j\ufffd.succeeded", "mismatch")]
    assert query(live, "SELECT state FROM jobs WHERE job_id = ?", good) == [("succeeded",)]
