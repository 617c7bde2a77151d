"""Hostile submissions (hypothesis) thrown at ``jf.submit.>`` of a secured stack as an
anonymous client, for a bounded number of examples: each gets an answer, an accepted job
(its id) or a rejection with its reason; the rejections are recorded in the log; the
sentinel keeps serving (the same process all along); and a valid job submitted afterwards
completes.

Hypothesis drives synchronous examples, so the stack lives on an event loop of its own,
in a thread; each example runs there."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

import nats
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jetflow import connect
from jetflow.core import subjects as S
from jetflow.core.submission import MAX_ARGS_DEPTH, MAX_SUBMISSION_BYTES
from jetflow.up import Stack
from tests.conftest import read_log

T = TypeVar("T")
EXAMPLES = 400
REPLY_S = 10.0


class Loop:
    """An event loop in a thread: what the examples run on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 120.0) -> T:
        async def wrapped() -> T:
            return await coro
        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class World:
    def __init__(self, loop: Loop, stack: Stack, nc: Any) -> None:
        self.loop, self.stack, self.nc = loop, stack, nc
        self.answers: list[dict[str, Any]] = []
        self.sentinel_pid = stack.sentinels[0].pid

    def submit(self, queue: str, body: bytes, headers: dict[str, str] | None) -> dict[str, Any]:
        reply = self.loop.run(self.nc.request(S.submit_subject(queue), body, timeout=REPLY_S,
                                              headers=headers))
        answer = orjson.loads(reply.data)
        self.answers.append(answer)
        return dict(answer)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    loop = Loop()
    stack = Stack(data_dir=tmp_path_factory.mktemp("fuzz") / "up", port=0, workers=1,
                  handlers="echo", projector=False, auth=True)
    loop.run(stack.start())
    nc = loop.run(nats.connect(stack.url))  # anonymous: the submitter role
    try:
        yield World(loop, stack, nc)
    finally:
        loop.run(nc.close())
        loop.run(stack.stop())
        loop.close()


# -- what is thrown ------------------------------------------------------------------------

FIELDS = ["handler", "args", "priority", "job_id", "max_attempts", "timeout_s",
          "queue_timeout_s", "deadline_s", "retry", "correlation_id", "workflow", "input",
          "output", "context", "version", "workflow_id"]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
           | st.text(max_size=40))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
ids = st.sampled_from(["ok-1", "a.b", "*", ">", "a b", "", "x" * 200, "é", "a\n"]) | st.text(
    max_size=20)
handlers = st.sampled_from(["echo", "nope", "", "a.b", "x" * 200, "echo "]) | st.text(max_size=10)


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


ADVERSARIAL = [
    b"", b"null", b"[]", b'"echo"', b"{", b"\xff\xfe{}", "{}".encode("utf-16"),
    b'{"handler": "echo", "args": {"n": 1e400}}', b'{"handler": "echo", "args": NaN}',
    b'{"handler": "echo", "handler": "nope"}', b'\xef\xbb\xbf{"handler": "echo"}',
    b'{"handler": "echo", "args": {"big": 123456789012345678901234567890}}',
    orjson.dumps({"handler": "echo", "args": {"x": _nested(MAX_ARGS_DEPTH + 5)}}),
    b'{"handler": "echo", "args": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    # a "$bigint" makes the codec walk the body: 1,000 levels must not crash it
    b'{"handler": "echo", "x": "$bigint", "args": {"a": ' + b"[" * 1000 + b"]" * 1000 + b"}}",
    b'{"handler": "echo", "args": {"n": {"$bigint": "' + b"9" * 5000 + b'"}}}',
    orjson.dumps({"handler": "echo", "args": {"pad": "x" * (MAX_SUBMISSION_BYTES + 10)}}),
    orjson.dumps({"handler": "echo", "job_id": "jf.job.x.succeeded"}),
    orjson.dumps({"workflow": "no-such-template"}),
    orjson.dumps({"workflow": "a.b", "context": {}}),
    orjson.dumps({"workflow": "w", "context": _nested(MAX_ARGS_DEPTH + 5)}),
    b'{"handler": "echo", "priority": 1000000000000000000000000000000}',
    orjson.dumps({"handler": "echo", "input": "\0"}),
]

submissions = st.dictionaries(st.sampled_from(FIELDS), json_values | ids, max_size=6) | \
    st.fixed_dictionaries({"handler": handlers}, optional={
        "args": st.dictionaries(st.text(max_size=6), json_values, max_size=3),
        "priority": st.integers(-3, 12), "job_id": ids, "max_attempts": st.integers(-1, 200),
        "timeout_s": st.floats(-1, 1e9), "correlation_id": ids})
bodies = st.one_of(st.binary(max_size=300), json_values.map(lambda v: _safe_dumps(v)),
                   submissions.map(lambda d: _safe_dumps(d)), st.sampled_from(ADVERSARIAL))
header_text = st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=40)
headers = st.none() | st.dictionaries(
    st.sampled_from([S.HDR_MSG_ID, S.HDR_CORRELATION_ID, S.HDR_TRACEPARENT, "Jf-Sig",
                     "Jf-Sig-Ed25519", "X-Anything", "Nats-Expected-Stream",
                     "Nats-Expected-Last-Sequence", "Nats-Expected-Last-Msg-Id",
                     S.HDR_EXPECTED_SUBJECT_SEQ, "Nats-Rollup", "Nats-TTL"]),
    header_text | ids, max_size=3)
queues = st.sampled_from(["default", "fuzz"]) | st.from_regex(r"\A[A-Za-z0-9_-]{1,12}\Z")


def _safe_dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits, as other JSON writers write them
        return json.dumps(value).encode()


def test_hostile_submissions_are_answered_and_the_sentinel_keeps_serving(world: World) -> None:
    """Each hostile submission is answered: accepted (a job id) or rejected with its reason
    and code; then the same sentinel process serves on, every rejection that names a job
    is recorded in the log, and a valid job completes."""

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(queue=queues, body=bodies, hdrs=headers)
    def each(queue: str, body: bytes, hdrs: dict[str, str] | None) -> None:
        answer = world.submit(queue, body, hdrs)
        if "error" in answer:
            assert isinstance(answer["error"], str) and answer["error"], answer
            assert isinstance(answer.get("code"), str) and answer["code"], answer
        else:
            assert S.check_job_id(answer.get("job_id") or answer.get("workflow_id")), answer

    each()
    assert len(world.answers) >= EXAMPLES
    sentinel = world.stack.sentinels[0]
    # never crashed (a stack started without restart=True restarts nothing)
    assert sentinel.running and sentinel.pid == world.sentinel_pid
    rejected = {a["job_id"] for a in world.answers if "error" in a and a.get("job_id")}
    assert rejected and any("job_id" in a and "error" not in a for a in world.answers)

    async def check() -> None:
        client = await connect(world.stack.url)
        try:
            job_id = await client.submit("echo", {"after": "fuzz"}, reply_timeout_s=10)
            done = await client.wait(job_id, timeout=60)
            assert done.state == "succeeded" and done.result == {"after": "fuzz"}
        finally:
            await client.close()
        recorded = {e.id for e in await read_log(world.stack.url) if e.type == "rejected"}
        assert rejected <= recorded, sorted(rejected - recorded)[:5]
    world.loop.run(check())


def test_plain_publish_of_hostile_bodies_leaves_nothing_unanswered_in_the_queue(
        world: World) -> None:
    """The same bodies as ``nats pub`` (no reply): JF_SUBMIT is drained all the same."""
    async def publish_all() -> int:
        for raw in ADVERSARIAL:
            await world.nc.publish(S.submit_subject("default"), raw)
        await world.nc.flush()
        js = world.nc.jetstream()
        for _ in range(100):
            pending = (await js.stream_info(S.SUBMIT_STREAM)).state.messages
            if pending == 0:
                return 0
            await asyncio.sleep(0.1)
        return int(pending)
    assert world.loop.run(publish_all()) == 0


def test_identical_requests_each_get_their_own_job(world: World) -> None:
    """The sentinel sees each ``submitted`` twice (appended, then read back): the second
    sight must not answer the next identical request with the previous job's id."""
    body = orjson.dumps({"handler": "echo", "args": {"same": "body"}})
    got = [world.submit("default", body, None)["job_id"] for _ in range(6)]
    got += [world.submit("default", body, {"X-Any": "1"})["job_id"] for _ in range(3)]
    assert len(set(got)) == len(got), got


def test_jetstream_headers_are_refused_at_once_and_do_not_block_the_next(world: World) -> None:
    body = orjson.dumps({"handler": "echo", "args": {"after": "headers"}})
    for name, value in [("Nats-Expected-Stream", "X"), ("Nats-Expected-Last-Sequence", "5"),
                        ("Nats-Rollup", "all"), ("Nats-TTL", "1s")]:
        answer = world.submit("default", body, {name: value})
        assert answer["code"] == "bad_header" and name in answer["error"], answer
    assert "error" not in world.submit("default", body, None)
