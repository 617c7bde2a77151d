"""Which workers the sentinel offers a plugin's jobs to (pure: the fleet model, no server).

A worker started with ``--plugins all`` announces ``@plugins`` and is granted every
deployed plugin's route; one started with ``--plugins NAMES`` announces those plugins'
routes only; a version with REQUIREMENTS goes only where its environment was built.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from jetflow.core.events import Event
from jetflow.core.plugin import PLUGIN_ROUTE, plugin_route
from jetflow.core.retry import RetryPolicy
from jetflow.core.snapshot import restore, take
from jetflow.workers.handlers import HandlerError
from jetflow.workers.worker import parse_plugins
from tests.test_scheduler_fleet import World


def deploy(w: World, name: str, requirements: list[str] | None = None) -> None:
    w.store(Event("plugin", name, "deployed", 1.0, {
        "version": "1", "sha256": name[0] * 64, "outputs": None,
        "requirements": requirements or [], "by": "test"}))


def plugin_job(w: World, job_id: str, name: str, env: bool = False) -> None:
    pin: dict[str, Any] = {"version": "1", "sha256": name[0] * 64}
    if env:
        pin["env"] = True
    w.store(Event("job", job_id, "submitted", 1.0, {
        "queue": "default", "handler": name, "args": {}, "priority": 0, "max_attempts": 3,
        "plugin": pin, "input": "/in.csv"}))
    append = w.fleet.decide(job_id, 1.0, 0.5)
    assert append is not None and append.event.type == "queued"
    w.commit(append)


def offered(w: World) -> dict[str, str]:
    w.beat(2.0)
    return {d.job.job_id: d.worker_id for d in w.fleet.dispatch(2.0)}


def test_all_serves_every_plugin_names_serve_theirs() -> None:
    w = World()
    deploy(w, "alpha")
    w.join("w-all", ["echo", PLUGIN_ROUTE], concurrency=4)
    w.join("w-beta", [plugin_route("beta")], concurrency=4)
    deploy(w, "beta")  # deployed after both joined: granted to the all-worker too
    deploy(w, "gamma")
    plugin_job(w, "a", "alpha")
    plugin_job(w, "g", "gamma")
    assert offered(w) == {"a": "w-all", "g": "w-all"}
    w.fleet.workers.pop("w-all")
    w.fleet.sched.remove_worker("w-all")
    plugin_job(w, "b", "beta")
    plugin_job(w, "a2", "alpha")
    assert offered(w) == {"b": "w-beta"}  # alpha's job waits: nobody left serves it


def test_an_environment_is_granted_only_to_a_worker_that_serves_the_plugin() -> None:
    w = World()
    w.join("w-alpha", [plugin_route("alpha")], concurrency=2)
    w.join("w-other", [plugin_route("other")], concurrency=2)
    deploy(w, "alpha", ["numpy"])
    plugin_job(w, "a", "alpha", env=True)
    assert offered(w) == {}  # queued, visibly, until an environment is ready
    for worker in ("w-other", "w-alpha"):  # w-other's record must not route alpha there
        w.store(Event("plugin", "alpha", "env_ready", 2.0,
                      {"version": "1", "worker": worker}))
    assert offered(w) == {"a": "w-alpha"}


def test_grants_survive_a_rejoin_and_a_snapshot() -> None:
    w = World()
    w.join("w1", [PLUGIN_ROUTE], concurrency=4)
    deploy(w, "alpha", ["numpy"])
    deploy(w, "beta")
    w.store(Event("plugin", "alpha", "env_ready", 2.0, {"version": "1", "worker": "w1"}))
    w.join("w1", [PLUGIN_ROUTE], concurrency=4)  # lost, then joined again
    granted = w.fleet.sched.workers()["w1"].handlers
    assert {plugin_route("alpha"), plugin_route("beta"), "@env:alpha:1"} <= granted
    doc = orjson.loads(orjson.dumps(take(w.fleet, tip="", stream_created="")))
    restored = restore(doc, policy=RetryPolicy(), queue_policies={}, lease_s=15.0)
    assert restored.sched.workers()["w1"].handlers == granted


@pytest.mark.parametrize(("value", "names"), [
    ("all", None), ("none", frozenset()), ("a", frozenset({"a"})),
    (" a, b-2 ,c_3", frozenset({"a", "b-2", "c_3"})),
])
def test_plugins_option(value: str, names: frozenset[str] | None) -> None:
    assert parse_plugins(value) == names


@pytest.mark.parametrize("value", ["", ",", "a.b", "a b", "*", "jf.>"])
def test_plugins_option_refuses_what_is_not_a_name(value: str) -> None:
    with pytest.raises(HandlerError, match="--plugins is all, none or plugin names"):
        parse_plugins(value)
