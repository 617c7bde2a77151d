"""What the `jetflow` commands say when they cannot do what was asked: one line (JSON on
stdout with ``--json``), never a traceback: a server where no sentinel ever ran, no
sentinel answering, a URL that is no URL, arguments that are no JSON, a wait that ends
before the job does, a job that does not exist."""

from __future__ import annotations

import json

import pytest

from jetflow import Client
from jetflow.adapters.nats_server import EmbeddedServer
from tests.conftest import StackFactory
from tests.test_projections_e2e import cli

pytestmark = pytest.mark.e2e


def one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


async def test_a_server_where_no_sentinel_ever_ran(server: EmbeddedServer) -> None:
    """A bare nats-server: no streams, nothing listening on jetflow's subjects."""
    code, _, err = await cli(server.url, "history", "j1")
    assert code == 1 and "no JF_EVENTS stream" in one_line(err) and "jetflow up" in err
    code, out, err = await cli(server.url, "trace", "j1", "--json")
    assert code == 1 and err == "" and "no JF_EVENTS stream" in json.loads(out)["error"]
    code, _, err = await cli(server.url, "submit", "echo")
    line = one_line(err)
    assert code == 1 and "no jetflow sentinel is running" in line
    assert "nothing was submitted" in line
    code, out, err = await cli(server.url, "cancel", "j1", "--json")
    assert code == 1 and err == ""
    assert "nothing listens on jf.ctl.cancel" in json.loads(out)["error"]


async def test_no_sentinel_answering_a_cancel_is_one_line(client: Client) -> None:
    """The streams exist (a sentinel ran once) but none runs now."""
    code, _, err = await cli(client.nc.connected_url.geturl(), "retry", "j1")
    line = one_line(err)
    assert code == 1 and "nothing listens on jf.ctl.retry" in line
    assert "nothing was submitted" not in line


@pytest.mark.parametrize("url", ["nats://bad:url:x", "nats://:0"])
async def test_a_url_that_is_no_url_is_one_line(url: str) -> None:
    code, out, err = await cli(url, "history", "j1", "--json")
    assert code == 1 and err == "" and "is not a NATS URL" in json.loads(out)["error"]


async def test_submit_errors_with_json_are_json(make_stack: StackFactory) -> None:
    stack = await make_stack(workers=0)
    for args, expected in ((["--args", "{bad"], "--args is not valid JSON"),
                           (["--args", "[1]"], "--args must be a JSON object")):
        code, out, err = await cli(stack.url, "submit", "echo", *args, "--json")
        assert (code, err) == (1, "") and expected in json.loads(out)["error"]
        code, out, err = await cli(stack.url, "submit", "echo", *args)
        assert code == 1 and out == "" and expected in one_line(err)
    # a rejection says which job it was recorded as
    code, out, err = await cli(stack.url, "submit", "nope", "--json")
    answer = json.loads(out)
    assert code == 2 and answer["job_id"] and answer["rejected"]["code"] == "unknown_handler"


async def test_a_wait_that_ends_first_says_which_job_goes_on(make_stack: StackFactory) -> None:
    stack = await make_stack(workers=1)
    await stack.workers[0].stop()  # `echo` is known, and no worker runs it now
    code, out, err = await cli(stack.url, "submit", "echo", "--wait", "--wait-timeout", "1",
                               "--json")
    answer = json.loads(out)
    assert (code, err, answer["state"]) == (1, "", "queued")
    assert answer["error"].startswith(f"timed out: job {answer['job_id']} is still queued")
    code, out, err = await cli(stack.url, "submit", "echo", "--wait", "--wait-timeout", "1")
    assert code == 1 and "is still queued after 1s; it goes on" in one_line(err)
