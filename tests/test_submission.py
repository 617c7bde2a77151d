"""Untrusted submission bodies, deterministic job ids, and the subject builders."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jetflow.core import subjects as S
from jetflow.core.codec import CodecError
from jetflow.core.submission import (
    JOB_ID_RE,
    MAX_SUBMISSION_BYTES,
    Submission,
    check_handler_known,
    derive_job_id,
    parse_submission,
    submission_fingerprint,
)

ROOT = Path(__file__).resolve().parent.parent
PROPERTY = settings(max_examples=200, deadline=None)
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse(body: Any, queue: str = "default", **kw: Any) -> Submission:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_submission(raw, queue, **kw)


def code_of(body: Any, **kw: Any) -> str:
    with pytest.raises(CodecError) as info:
        parse(body, **kw)
    assert info.value.message
    return info.value.code


# -- valid bodies ---------------------------------------------------------------------------

def test_minimal_body_gets_the_defaults() -> None:
    assert parse({"handler": "echo"}, "q1") == Submission(
        queue="q1", handler="echo", args={}, priority=0, job_id=None, max_attempts=3,
        timeout_s=None, correlation_id=None)


def test_full_body() -> None:
    body = {"handler": "pkg.mod:fn-2", "args": {"x": 1, "nested": [1, {"a": None}]},
            "priority": 9, "job_id": "order_42-A", "max_attempts": 5, "timeout_s": 2,
            "queue_timeout_s": 30, "deadline_s": 600, "retry": {"base_s": 0.5, "cap_s": 10},
            "correlation_id": "corr 1"}
    sub = parse(body)
    assert sub == Submission(
        queue="default", handler="pkg.mod:fn-2", args={"x": 1, "nested": [1, {"a": None}]},
        priority=9, job_id="order_42-A", max_attempts=5, timeout_s=2.0,
        queue_timeout_s=30.0, deadline_s=600.0, retry={"base_s": 0.5, "cap_s": 10.0},
        correlation_id="corr 1")
    assert isinstance(sub.timeout_s, float)


def test_nulls_mean_defaults() -> None:
    sub = parse({"handler": "echo", "args": None, "job_id": None, "timeout_s": None,
                 "correlation_id": None})
    assert (sub.args, sub.job_id, sub.timeout_s, sub.correlation_id) == ({}, None, None, None)


@pytest.mark.parametrize("priority", [0, 1, 5, 9])
def test_priority_range(priority: int) -> None:
    assert parse({"handler": "echo", "priority": priority}).priority == priority


def test_default_max_attempts_is_configurable() -> None:
    assert parse({"handler": "echo"}, default_max_attempts=7).max_attempts == 7
    assert parse({"handler": "echo", "max_attempts": 1}).max_attempts == 1
    assert parse({"handler": "echo", "max_attempts": 100}).max_attempts == 100


@pytest.mark.parametrize("job_id", ["a", "A-Z_0-9", "x" * 64, "-", "_"])
def test_good_job_ids(job_id: str) -> None:
    assert parse({"handler": "echo", "job_id": job_id}).job_id == job_id


def test_body_at_the_size_limit_is_accepted() -> None:
    body = orjson.dumps({"handler": "echo", "args": {"pad": ""}})
    pad = "x" * (MAX_SUBMISSION_BYTES - len(body))
    raw = orjson.dumps({"handler": "echo", "args": {"pad": pad}})
    assert len(raw) == MAX_SUBMISSION_BYTES
    assert parse(raw).args["pad"] == pad


# -- bad bodies -----------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"{", b"handler=echo", b'{"handler": "echo",}',
                                 b"\xff"])
def test_invalid_json(raw: bytes) -> None:
    assert code_of(raw) == "invalid_json"


@pytest.mark.parametrize("body", [[], ["handler"], "echo", 5, None, True])
def test_not_an_object(body: Any) -> None:
    assert code_of(body) == "not_object"


def test_missing_handler() -> None:
    assert code_of({}) == "missing_field"
    assert code_of({"args": {}}) == "missing_field"


@pytest.mark.parametrize("body", [{"handler": "echo", "prio": 5},
                                  {"handler": "echo", "Handler": "x"},
                                  {"handler": "echo", "__proto__": {}}])
def test_unknown_field(body: dict[str, Any]) -> None:
    with pytest.raises(CodecError) as info:
        parse(body)
    assert info.value.code == "unknown_field"
    unknown = (set(body) - {"handler"}).pop()
    assert unknown in info.value.message


def test_a_body_with_workflow_is_a_start_not_a_job() -> None:
    from jetflow.core.submission import parse_workflow_start
    assert code_of({"workflow": "etl"}) == "is_workflow"  # for parse_workflow_start
    start = parse_workflow_start(b'{"workflow": "etl", "context": {"n": 1}, "version": 2}',
                                 "bulk")
    assert start is not None and (start.workflow, start.version, start.queue) == (
        "etl", 2, "bulk") and start.context == {"n": 1}
    assert parse_workflow_start(b'{"handler": "echo"}', "default") is None
    for body, message in ((b'{"workflow": "etl", "handler": "echo"}', "unknown field(s)"),
                          (b'{"workflow": {"steps": []}}', "must be a template name"),
                          (b'{"workflow": "etl", "version": 0}', "positive integer"),
                          (b'{"workflow": "etl", "workflow_id": "a.b"}', "workflow id")):
        with pytest.raises(CodecError, match=None) as info:
            parse_workflow_start(body, "default")
        assert message in info.value.message, body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("priority", "5"), ("priority", True), ("priority", False), ("priority", 10),
        ("priority", -1), ("priority", 5.0), ("priority", None),
        ("max_attempts", 0), ("max_attempts", 101), ("max_attempts", "3"), ("max_attempts", True),
        ("timeout_s", 0), ("timeout_s", -1), ("timeout_s", "10"), ("timeout_s", True),
        ("timeout_s", 7 * 24 * 3600 + 1),
        ("handler", 5), ("handler", ""), ("handler", "a b"), ("handler", "a/b"),
        ("handler", "x" * 129), ("handler", None), ("handler", ["echo"]),
        ("handler", "echo\n"),
        ("args", []), ("args", "x=1"), ("args", 1),
        ("correlation_id", ""), ("correlation_id", 5), ("correlation_id", "c" * 129),
    ],
)
def test_wrong_types_and_ranges(field: str, value: Any) -> None:
    body = {"handler": "echo", field: value}
    assert code_of(body) == "bad_field"


@pytest.mark.parametrize("job_id", ["a.b", "a*", "*", ">", "a>", "a b", " a", "a\tb", "a\n",
                                    "x" * 65, "", "é", "a/b", 5, ["a"], True])
def test_bad_job_id(job_id: Any) -> None:
    assert code_of({"handler": "echo", "job_id": job_id}) == "bad_job_id"


def test_oversized_body() -> None:
    raw = orjson.dumps({"handler": "echo", "args": {"pad": "x" * MAX_SUBMISSION_BYTES}})
    with pytest.raises(CodecError) as info:
        parse(raw)
    assert info.value.code == "too_large"
    assert str(MAX_SUBMISSION_BYTES) in info.value.message
    assert code_of(b'{"handler": "echo"}', max_bytes=10) == "too_large"
    assert code_of(b"x" * 11, max_bytes=10) == "too_large"  # size is checked first


@PROPERTY
@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_codec_error(raw: bytes) -> None:
    try:
        sub = parse_submission(raw, "q")
    except CodecError as exc:
        assert exc.code in {"invalid_json", "not_object", "unknown_field", "missing_field",
                            "bad_field", "bad_job_id", "unsupported"}
    else:
        assert sub.queue == "q"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False,
                                                                         allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8,
)
bodies = st.fixed_dictionaries(
    {},
    optional={name: json_values | st.sampled_from(good) for name, good in {
        "handler": ["echo", "a.b:c"], "args": [{}, {"x": 1}], "priority": [0, 9],
        "job_id": ["j-1", "a" * 64], "max_attempts": [1, 100], "timeout_s": [0.5, 60],
        "correlation_id": ["c"], "zzz": [1],
    }.items()},
)


@PROPERTY
@given(bodies)
def test_accepted_bodies_are_fully_valid(body: dict[str, Any]) -> None:
    try:
        sub = parse(body)
    except CodecError:
        return
    assert set(body) <= {"handler", "args", "priority", "job_id", "max_attempts", "timeout_s",
                         "correlation_id"}
    assert isinstance(sub.handler, str) and sub.handler == body["handler"]
    assert isinstance(sub.args, dict)
    assert type(sub.priority) is int and 0 <= sub.priority <= 9
    assert type(sub.max_attempts) is int and 1 <= sub.max_attempts <= 100
    assert sub.job_id is None or ID_PATTERN.fullmatch(sub.job_id)
    assert sub.timeout_s is None or sub.timeout_s > 0


# -- handlers -------------------------------------------------------------------------------

def test_check_handler_known() -> None:
    sub = parse({"handler": "echo"})
    check_handler_known(sub, {"echo", "sleep"})
    with pytest.raises(CodecError) as info:
        check_handler_known(sub, {"sleep", "add"})
    assert info.value.code == "unknown_handler"
    assert "'echo'" in info.value.message and "add, sleep" in info.value.message
    with pytest.raises(CodecError) as info:
        check_handler_known(sub, set())
    assert info.value.code == "unknown_handler"
    assert "start a worker" in info.value.message


# -- job ids --------------------------------------------------------------------------------

def test_job_id_from_msg_id_ignores_sequence_and_epoch() -> None:
    a = derive_job_id("order-42", "epoch-1", 1)
    assert a == derive_job_id("order-42", "epoch-1", 999)
    assert a == derive_job_id("order-42", "epoch-2", 1)
    assert a != derive_job_id("order-43", "epoch-1", 1)


def test_job_id_without_msg_id_depends_on_epoch_and_seq() -> None:
    a = derive_job_id(None, "epoch-1", 1)
    assert a == derive_job_id(None, "epoch-1", 1)
    assert a != derive_job_id(None, "epoch-1", 2)
    assert a != derive_job_id(None, "epoch-2", 1)
    assert derive_job_id("", "epoch-1", 1) == a  # an empty Nats-Msg-Id is no msg id


def test_msg_id_and_sequence_ids_do_not_collide() -> None:
    assert derive_job_id("epoch:1", "x", 0) != derive_job_id(None, "epoch", 1)


@PROPERTY
@given(st.one_of(st.none(), st.text(max_size=100)), st.text(max_size=40),
       st.integers(0, 2**63))
def test_derived_ids_are_valid_tokens(msg_id: str | None, epoch: str, seq: int) -> None:
    job_id = derive_job_id(msg_id, epoch, seq)
    assert ID_PATTERN.fullmatch(job_id)
    assert JOB_ID_RE.match(job_id)
    assert S.check_token(job_id) == job_id
    assert job_id == derive_job_id(msg_id, epoch, seq)


@PROPERTY
@given(st.lists(st.integers(0, 10**9), min_size=2, max_size=50, unique=True))
def test_distinct_sequences_give_distinct_ids(seqs: list[int]) -> None:
    assert len({derive_job_id(None, "e", s) for s in seqs}) == len(seqs)


def test_submission_fingerprint() -> None:
    fp = submission_fingerprint("jf.submit.default", "m1", b'{"handler":"echo"}')
    assert fp == submission_fingerprint("jf.submit.default", "m1", b'{"handler":"echo"}')
    assert re.fullmatch(r"[0-9a-f]{24}", fp)
    others = {
        submission_fingerprint("jf.submit.other", "m1", b'{"handler":"echo"}'),
        submission_fingerprint("jf.submit.default", "m2", b'{"handler":"echo"}'),
        submission_fingerprint("jf.submit.default", None, b'{"handler":"echo"}'),
        submission_fingerprint("jf.submit.default", "m1", b'{"handler":"sleep"}'),
        # the parts are separated, so moving bytes between them changes the fingerprint
        submission_fingerprint("jf.submit.default", "m", b'1{"handler":"echo"}'),
    }
    assert fp not in others and len(others) == 5
    assert submission_fingerprint("s", None, b"x") == submission_fingerprint("s", "", b"x")


# -- subjects -------------------------------------------------------------------------------

BAD_TOKENS = ["a.b", ".", "a*", "*", ">", "a>", "a b", " ", "a\tb", "a\n", "\n", "a\r\nb",
              "", "x" * 129, "é", None, 5]

BUILDERS = [
    lambda t: S.job_subject(t, "queued"),
    lambda t: S.job_subject("j1", t),
    lambda t: S.job_filter(t),
    lambda t: S.worker_subject(t, "joined"),
    lambda t: S.worker_subject("w1", t),
    lambda t: S.submit_subject(t),
    lambda t: S.work_subject(t),
    lambda t: S.log_subject(t, 1),
    lambda t: S.log_filter(t),
    lambda t: S.heartbeat_subject(t),
    lambda t: S.event_subject("job", t, "queued"),
    lambda t: S.event_subject("worker", "w1", t),
    lambda t: S.entity_filter("job", t),
    lambda t: S.check_token(t),
]


@pytest.mark.parametrize("builder", range(len(BUILDERS)))
@pytest.mark.parametrize("token", BAD_TOKENS, ids=repr)
def test_builders_refuse_unsafe_tokens(builder: int, token: Any) -> None:
    with pytest.raises(S.InvalidToken):
        BUILDERS[builder](token)


def test_invalid_token_is_a_value_error() -> None:
    assert issubclass(S.InvalidToken, ValueError)


def test_builders() -> None:
    assert S.job_subject("j1", "queued") == "jf.job.j1.queued"
    assert S.job_filter("j1") == "jf.job.j1.*"
    assert S.worker_subject("w-1", "joined") == "jf.worker.w-1.joined"
    assert S.submit_subject("default") == "jf.submit.default"
    assert S.work_subject("w1") == "jf.work.w1"
    assert S.log_subject("j1", 2) == "jf.log.j1.2"
    assert S.log_filter("j1") == "jf.log.j1.*"
    assert S.heartbeat_subject("host:1") == "jf.hb.host:1"
    assert S.event_subject("wf", "f1", "started") == "jf.wf.f1.started"
    assert S.entity_filter("worker", "w1") == "jf.worker.w1.*"
    assert S.check_token("x" * 128) == "x" * 128


def test_unknown_event_kind_is_refused() -> None:
    with pytest.raises(S.InvalidToken):
        S.event_subject("jobs", "j1", "queued")
    with pytest.raises(S.InvalidToken):
        S.entity_filter("submit", "j1")


@pytest.mark.parametrize("kind", S.EVENT_KINDS)
def test_parse_event_subject_inverts_the_builder(kind: str) -> None:
    assert S.parse_event_subject(S.event_subject(kind, "id-1", "started")) == \
        (kind, "id-1", "started")


@pytest.mark.parametrize("subject", ["", "jf", "jf.job.j1", "jf.job.j1.queued.x",
                                     "xx.job.j1.queued", "jf.submit.default.x",
                                     "jf.log.j1.1", "jf.hb.w1.x", "JF.job.j1.queued"])
def test_parse_event_subject_refuses_other_shapes(subject: str) -> None:
    assert S.parse_event_subject(subject) is None


def test_queue_of_submit_subject() -> None:
    assert S.queue_of_submit_subject("jf.submit.default") == "default"
    assert S.queue_of_submit_subject(S.submit_subject("gpu-1")) == "gpu-1"
    for subject in ["jf.submit", "jf.submit.a.b", "jf.work.a", "xx.submit.a", "jf.submit.",
                    "jf.submit.a b"]:
        assert S.queue_of_submit_subject(subject) is None, subject


def test_nats_conf_exists() -> None:
    conf = ROOT / "nats.conf"
    assert conf.is_file()
    assert "jetstream" in conf.read_text()


def test_every_stream_subject_is_under_the_prefix() -> None:
    assert S.PREFIX == "jf"
    subjects = (S.EVENTS_SUBJECTS + S.SUBMIT_SUBJECTS + S.WORK_SUBJECTS + S.LOGS_SUBJECTS
                + S.HEARTBEAT_SUBJECTS + [S.SUBMIT_WILDCARD, S.CONTROL_CANCEL])
    for subject in subjects:
        assert subject.startswith("jf."), subject
    assert sorted(S.EVENTS_SUBJECTS) == ["jf.job.>", "jf.plugin.>", "jf.wf.>", "jf.worker.>"]
    assert S.SUBMIT_SUBJECTS == ["jf.submit.>"]
    assert (S.EVENTS_STREAM, S.SUBMIT_STREAM, S.LOGS_STREAM, S.HEARTBEAT_STREAM) == \
        ("JF_EVENTS", "JF_SUBMIT", "JF_LOGS", "JF_HEARTBEATS")


@pytest.mark.parametrize("retry", [{"base_s": -1}, {"factor": 0.5}, {"speed": 2}, [1], "x",
                                   {"cap_s": "10"}])
def test_bad_retry_settings_are_rejected(retry: Any) -> None:
    assert code_of({"handler": "echo", "retry": retry}) == "bad_field"


@given(st.binary(min_size=10, max_size=10))
def test_the_job_id_letters_are_rfc_4648_base32(ten: bytes) -> None:
    import base64

    from jetflow.core.submission import _base32

    assert _base32(ten) == base64.b32encode(ten).decode().lower()
