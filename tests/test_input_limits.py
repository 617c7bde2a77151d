"""The input limits' pure part: what a submission, a template or a log line may be, and the
clear reason given when it is more (no server)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from jetflow.core import subjects as S
from jetflow.core.codec import CodecError
from jetflow.core.submission import (
    MAX_ARGS_DEPTH,
    MAX_SUBMISSION_BYTES,
    parse_submission,
    parse_workflow_start,
)
from jetflow.core.template import MAX_TEMPLATE_BYTES, TemplateError, parse_template
from jetflow.workers.attempt import MAX_LINE_BYTES, clip_line


def nested(depth: int) -> Any:
    value: Any = {}
    for i in range(depth - 1):
        value = {"a": value} if i % 2 else [value]
    return value


def test_args_nested_to_the_limit_are_accepted_one_more_level_is_refused() -> None:
    ok = parse_submission(orjson.dumps({"handler": "echo", "args": {"x": nested(
        MAX_ARGS_DEPTH - 1)}}), "default")
    assert ok.handler == "echo"
    with pytest.raises(CodecError) as err:
        parse_submission(orjson.dumps({"handler": "echo", "args": {"x": nested(
            MAX_ARGS_DEPTH)}}), "default")
    assert err.value.code == "too_deep" and f"deeper than {MAX_ARGS_DEPTH}" in str(err.value)


def test_a_workflow_context_has_the_same_depth_limit() -> None:
    assert parse_workflow_start(orjson.dumps({"workflow": "w", "context": nested(
        MAX_ARGS_DEPTH)}), "default") is not None
    with pytest.raises(CodecError) as err:
        parse_workflow_start(orjson.dumps({"workflow": "w", "context": nested(
            MAX_ARGS_DEPTH + 1)}), "default")
    assert err.value.code == "too_deep"


def test_wide_args_are_no_deeper_for_being_wide() -> None:
    wide = {"handler": "echo", "args": {str(i): [[i]] for i in range(5000)}}
    assert len(parse_submission(orjson.dumps(wide), "default").args) == 5000


def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    body = b'{"handler": "echo", "args": {"x": "' + b"y" * MAX_SUBMISSION_BYTES + b'"}}'
    with pytest.raises(CodecError) as err:
        parse_submission(body, "default")
    assert err.value.code == "too_large"


@pytest.mark.parametrize("bad", ["a.b", "a*", ">", "a b", "a\tb", "a\n", "", "x" * 129,
                                 "é", None, 5])
def test_identifiers_that_would_change_a_subject_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        S.check_token(bad, "job id")
    if isinstance(bad, str):
        with pytest.raises(CodecError):
            parse_submission(orjson.dumps({"handler": "echo", "job_id": bad}), "default")


def test_a_template_over_the_size_limit_is_refused_with_its_size() -> None:
    big = "x" * (MAX_TEMPLATE_BYTES // 4)
    doc = {"name": "big", "steps": [{"name": f"s{i}", "handler": "echo", "args": {"p": big}}
                                    for i in range(5)]}
    with pytest.raises(TemplateError, match="bytes stored, more than"):
        parse_template(doc)
    doc["steps"] = doc["steps"][:1]
    assert parse_template(doc).name == "big"


def test_a_long_log_line_is_cut_and_says_how_long_it_was() -> None:
    assert clip_line("short") == "short"
    exact = "y" * MAX_LINE_BYTES
    assert clip_line(exact) == exact
    cut = clip_line("é" * MAX_LINE_BYTES)  # 2 bytes each: never half a character
    assert cut.endswith(f"[jetflow: line cut, {2 * MAX_LINE_BYTES:,} bytes]")
    assert len(cut.encode()) < MAX_LINE_BYTES + 64


def test_of_jetstream_s_headers_a_submission_takes_only_its_msg_id() -> None:
    from jetflow.core.submission import header_problem

    assert header_problem({}) is None
    assert header_problem({"Nats-Msg-Id": "o-1", "traceparent": "x", "X-Any": "y"}) is None
    for name in ("Nats-Expected-Stream", "Nats-Rollup", "nats-ttl", "NATS-Expected-Last-Msg-Id"):
        problem = header_problem({"Nats-Msg-Id": "o-1", name: "v"})
        assert problem is not None and name in problem and "Nats-Msg-Id" in problem


def test_a_body_the_codec_would_recurse_through_too_deep_is_refused_not_crashed() -> None:
    body = b'{"handler":"echo","x":"$bigint","args":{"a":' + b"[" * 1000 + b"]" * 1000 + b"}}"
    with pytest.raises(CodecError) as err:
        parse_submission(body, "default")
    assert err.value.code == "too_deep"
