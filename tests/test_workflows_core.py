"""Workflows in the pure core, against every example's exact result: the sentinel's
model folding a log, workers running the example handlers in-process (no server)."""

from __future__ import annotations

import pytest

from jetflow.core.template import TemplateError, parse_template
from jetflow.core.workflow import step_job_id
from tests.workflow_world import WorkflowWorld, example


def run(name: str, context: object) -> tuple[WorkflowWorld, object]:
    world = WorkflowWorld()
    wf = world.start(example(name), context)
    end = world.run(wf)
    return world, end


@pytest.mark.parametrize(("n", "expected"), [(6, 69), (10, 165)])
def test_linear(n: int, expected: int) -> None:
    world, end = run("linear", {"even_number": n})
    assert end.type == "succeeded" and end.data["result"] == expected


def test_diamond() -> None:
    _, end = run("diamond", {"even_number": 4})
    assert end.type == "succeeded" and end.data["result"] == 4**16


def test_tree_reaches_beyond_64_bits_exactly() -> None:
    _, end = run("tree", {"even_number": 2})
    assert end.type == "succeeded" and end.data["result"] == 2**64
    _, end = run("tree", {"even_number": 6})
    assert end.data["result"] == 6**64 and isinstance(end.data["result"], int)


def test_mixed_dag() -> None:
    _, end = run("mixed_dag", {"even_number": 6})
    assert end.type == "succeeded" and end.data["result"] == 6**64


def approval(amount: object) -> tuple[WorkflowWorld, object]:
    return run("conditional_approval", {} if amount is None else {"amount": amount})


@pytest.mark.parametrize(("amount", "path", "ran"), [
    (500, "auto", {"auto_approve"}),
    (999.99, "auto", {"auto_approve"}),
    (1000, "manager_only", {"manager_approval"}),
    (3000, "manager_only", {"manager_approval"}),
    (5000, "dual", {"manager_approval", "finance_review"}),
    (10000, "dual", {"manager_approval", "finance_review"}),
])
def test_conditional_approval_routes(amount: float, path: str, ran: set[str]) -> None:
    world, end = approval(amount)
    assert end.type == "succeeded"
    assert end.data["result"]["approval_path"] == path
    assert len(end.data["result"]["approvals"]) == len(ran)
    for step in ("auto_approve", "manager_approval", "finance_review"):
        expected = "succeeded" if step in ran else "skipped"
        assert world.step_state("w1", step) == expected, step
    skipped = world.step_events("w1", next(iter({"auto_approve", "finance_review"} - ran)))
    assert "did not choose it" in skipped[-1].data["reason"]


@pytest.mark.parametrize("amount", [0, -5, None, "lots"])
def test_conditional_approval_refuses_bad_amounts_permanently(amount: object) -> None:
    world, end = approval(amount)
    assert end.type == "failed"
    events = world.step_events("w1", "validate_request")
    failed = [e for e in events if e.type == "failed"]
    assert len(failed) == 1 and not failed[0].data["retryable"]
    assert "context.amount must be a number above 0" in failed[0].data["message"]
    assert events[-1].type == "dead_lettered"
    for step in ("routing_decision", "auto_approve", "finance_review", "finalize_approval"):
        assert world.step_state("w1", step) == "skipped"


def csv_text(rows: int) -> str:
    return "id,value\n" + "".join(f"{i},{i % 7}\n" for i in range(rows))


def test_csv_batch_thousand_rows_five_workers() -> None:
    world, end = run("csv_batch", {"csv": csv_text(1000), "batch_size": 200})
    assert end.type == "succeeded"
    assert end.data["result"]["total_processed"] == 1000
    assert end.data["result"]["worker_count"] == 5
    assert end.data["result"]["column_total"] == sum(i % 7 for i in range(1000))
    for i in range(5):
        assert world.step_state("w1", f"process_csv_batch_{i:03d}") == "succeeded"
    assert world.step_events("w1", "process_csv_batch_005") == []


def test_csv_batch_widens_ranges_beyond_max_workers() -> None:
    _, end = run("csv_batch", {"csv": csv_text(1000), "batch_size": 100, "max_workers": 4})
    assert end.data["result"] == {"total_processed": 1000, "worker_count": 4,
                                  "column_total": float(sum(i % 7 for i in range(1000)))}


def test_csv_batch_empty_has_no_workers_and_succeeds() -> None:
    world, end = run("csv_batch", {"csv": "id,value\n", "batch_size": 200})
    assert end.type == "succeeded"
    assert end.data["result"] == {"total_processed": 0, "worker_count": 0, "column_total": 0}
    assert world.step_events("w1", "process_csv_batch_000") == []


def test_retry_then_succeed_takes_three_attempts() -> None:
    world, end = run("retry_then_succeed", {})
    assert end.type == "succeeded"
    assert end.data["result"] == {"attempts_before_success": 3}
    started = [e for e in world.step_events("w1", "fail_twice_then_succeed")
               if e.type == "started"]
    assert len(started) == 3


def test_permanent_error_fails_after_one_attempt() -> None:
    world, end = run("permanent_error", {})
    assert end.type == "failed" and end.data["failed_steps"] == ["permanent_error_step"]
    events = world.step_events("w1", "permanent_error_step")
    assert [e.type for e in events].count("started") == 1
    assert events[-1].type == "dead_lettered"


def test_retryable_error_dead_lettered_after_exactly_two_attempts() -> None:
    world, end = run("retryable_error", {})
    assert end.type == "failed"
    events = world.step_events("w1", "retryable_error_step")
    assert [e.type for e in events].count("started") == 2
    assert events[-1].type == "dead_lettered"


def test_three_roots_fail_but_the_good_one_succeeds() -> None:
    world, end = run("three_roots", {})
    assert end.type == "failed"
    assert sorted(end.data["failed_steps"]) == ["permanent_error_step", "retryable_error_step"]
    assert world.step_state("w1", "success_step") == "succeeded"
    assert [e.type for e in world.step_events("w1", "retryable_error_step")].count(
        "started") == 2
    assert end.data["result"] == {"success_step": {"ok": True}}


def template(steps: list[dict[str, object]], **top: object) -> object:
    return parse_template({"name": "t", "steps": steps, **top})


def test_failure_skips_descendants_and_independent_branches_finish() -> None:
    t = template([
        {"name": "a", "handler": "wf_permanent_error"},
        {"name": "b", "handler": "wf_succeed", "depends_on": ["a"]},
        {"name": "c", "handler": "wf_succeed", "depends_on": ["b"]},
        {"name": "x", "handler": "wf_succeed"},
        {"name": "y", "handler": "wf_succeed", "depends_on": ["x"]},
    ])
    world = WorkflowWorld()
    end = world.run(world.start(t, {}))  # type: ignore[arg-type]
    assert end.type == "failed"
    assert world.step_state("w1", "b") == "skipped"
    assert world.step_state("w1", "c") == "skipped"
    assert "parent a failed" in world.step_events("w1", "b")[-1].data["reason"]
    assert world.step_state("w1", "y") == "succeeded"


def test_fail_fast_cancels_pending_and_running_steps() -> None:
    calls: list[str] = []

    def slow(args: object, ctx: object) -> None:
        calls.append("slow")
        raise RuntimeError("not yet")  # retried, so it is still running when cancelled

    t = template([
        {"name": "bad", "handler": "wf_permanent_error"},
        {"name": "slow", "handler": "slow", "max_attempts": 50,
         "retry": {"base_s": 5, "factor": 1, "cap_s": 5}},
        {"name": "after", "handler": "wf_succeed", "depends_on": ["slow"]},
    ], fail_fast=True)
    world = WorkflowWorld({"slow": slow})
    end = world.run(world.start(t, {}))  # type: ignore[arg-type]
    assert end.type == "failed" and "fail_fast" in end.data["reason"]
    assert world.step_state("w1", "slow") == "cancelled"
    assert world.step_state("w1", "after") == "skipped"
    assert len(calls) == 1


def test_continue_on_failure_lets_dependents_run_with_null() -> None:
    t = template([
        {"name": "flaky", "handler": "wf_permanent_error", "continue_on_failure": True},
        {"name": "next", "handler": "echo_parents", "depends_on": ["flaky"]},
    ])
    world = WorkflowWorld({"echo_parents": lambda args, ctx: args["parents"]})
    end = world.run(world.start(t, {}))  # type: ignore[arg-type]
    assert end.type == "succeeded"
    assert end.data["result"] == {"flaky": None}


def test_a_decision_choosing_a_stranger_fails_the_step_clearly() -> None:
    t = template([
        {"name": "d", "handler": "choose", "type": "decision"},
        {"name": "a", "handler": "wf_succeed", "depends_on": ["d"]},
    ])
    world = WorkflowWorld({"choose": lambda args, ctx: {"branches": ["nope"]}})
    end = world.run(world.start(t, {}))  # type: ignore[arg-type]
    assert end.type == "failed"
    failed = [e for e in world.log if e.kind == "wf" and e.type == "step_failed"]
    assert failed and "chose ['nope'], which are not its children (a)" in \
        failed[0].data["error"]["message"]
    assert world.step_state("w1", "a") == "skipped"


def test_convergence_skipped_when_no_parent_ran() -> None:
    t = template([
        {"name": "d", "handler": "choose", "type": "decision"},
        {"name": "a", "handler": "wf_succeed", "depends_on": ["d"]},
        {"name": "c", "handler": "wf_succeed", "depends_on": ["a"], "type": "convergence"},
    ])
    world = WorkflowWorld({"choose": lambda args, ctx: {"branches": []}})
    end = world.run(world.start(t, {}))  # type: ignore[arg-type]
    assert end.type == "succeeded"
    assert world.step_state("w1", "a") == "skipped"
    assert world.step_state("w1", "c") == "skipped"


def test_each_step_runs_once_even_when_decisions_repeat() -> None:
    world = WorkflowWorld()
    wf = world.start(example("diamond"), {"even_number": 4})
    for _ in range(5):  # decisions asked again, as a restarted or second sentinel would
        world.fleet.workflows.reconcile()
        for w in world.fleet.workflows.runs.values():
            w.asked.clear()
        world.round()
    world.run(wf)
    for job_id, calls in world.worker_calls.items():
        assert calls == 1, job_id


@pytest.mark.parametrize(("steps", "message"), [
    ([{"name": "a", "handler": "h", "depends_on": ["b"]},
      {"name": "b", "handler": "h", "depends_on": ["a"]}], "a cycle: a -> b -> a"),
    ([{"name": "a", "handler": "h", "depends_on": ["zz"]}], "depends on unknown step 'zz'"),
    ([{"name": "a", "handler": "h"}, {"name": "a", "handler": "h"}], "duplicate step name 'a'"),
    ([{"name": "a", "handler": "h", "type": "fancy"}], "unknown type 'fancy'"),
    ([{"name": "a", "handler": "h", "type": "decision"}], "decision step without children"),
    ([{"name": "a", "handler": "h", "type": "batch", "worker": "b"},
      {"name": "b", "handler": "h", "depends_on": ["a"]}], "is not a batch_worker"),
])
def test_validation_names_the_problem(steps: list[dict[str, object]], message: str) -> None:
    with pytest.raises(TemplateError, match=None) as info:
        template(steps)
    assert message in str(info.value)


def test_validation_refuses_more_than_ten_thousand_steps() -> None:
    steps = [{"name": f"s{i}", "handler": "h"} for i in range(10_001)]
    with pytest.raises(TemplateError, match="10,001 steps, more than 10,000"):
        template(steps)


def test_step_job_ids_are_stable_and_valid() -> None:
    from jetflow.core.submission import job_id_problem
    assert step_job_id("w1", "a") == step_job_id("w1", "a") != step_job_id("w2", "a")
    assert job_id_problem(step_job_id("w1", "x" * 64)) is None


def test_big_integers_round_trip_exactly_through_the_codec() -> None:
    from jetflow.core.codec import dumps, loads
    value = {"n": 6**64, "list": [2**64, -(2**70), 5], "small": 2**63 - 1}
    raw = dumps(value)
    assert loads(raw) == value and isinstance(loads(raw)["n"], int)
    assert b'{"$bigint":"' + str(6**64).encode() + b'"}' in raw


@pytest.mark.parametrize(("name", "context", "cut"), [
    ("mixed_dag", {"even_number": 6}, 3), ("csv_batch", {"csv": "a,b\n" + "1,2\n" * 50,
                                                        "batch_size": 10}, 2),
    ("conditional_approval", {"amount": 7000}, 2), ("tree", {"even_number": 2}, 1)])
def test_a_sentinel_restored_from_its_snapshot_finishes_running_workflows(
        name: str, context: object, cut: int) -> None:
    from jetflow.core.codec import dumps, loads
    from jetflow.core.snapshot import restore, take
    world = WorkflowWorld()
    wf = world.start(example(name), context)
    for _ in range(cut):
        world.round()
    assert world.terminal(wf) is None
    doc = loads(dumps(take(world.fleet, tip="t", stream_created="c")))
    world.fleet = restore(doc, policy=world.fleet.policy, queue_policies={}, lease_s=15.0)
    assert wf in world.fleet.workflows.runs and world.fleet.template_digests
    end = world.run(wf)
    fresh = WorkflowWorld()
    expected = fresh.run(fresh.start(example(name), context))
    assert end.type == expected.type == "succeeded"
    assert end.data["result"] == expected.data["result"]
    assert all(calls == 1 for calls in world.worker_calls.values()), world.worker_calls


def test_projection_of_workflows_is_the_same_whatever_the_batches(tmp_path: object) -> None:
    """The projector's workflows, workflow templates and workflow_steps from a log of
    several workflows (one failed, one cancelled by fail_fast); every batching gives the
    same tables."""
    import sqlite3
    from pathlib import Path

    from jetflow.core import subjects as S
    from jetflow.core.codec import encode_event
    from jetflow.core.events import Event
    from jetflow.projections.views import Raw
    from tests.test_projections_views import build, dump

    world = WorkflowWorld()
    world.run(world.start(example("diamond"), {"even_number": 4}, "wd"))
    world.run(world.start(example("conditional_approval"), {"amount": 3000}, "wc"))
    world.run(world.start(example("three_roots"), {}, "wt"))
    world.store(Event("wf", "t:diamond", "registered", world.now, {
        "name": "diamond", "version": 1, "sha256": "ab" * 32, "steps": 4}))
    raws = [Raw(e.seq, S.event_subject(e.kind, e.id, e.type), encode_event(e), None)
            for e in world.log]
    base = Path(str(tmp_path))
    one = dump(build(base / "one.sqlite", raws, batch=1))
    assert dump(build(base / "many.sqlite", raws, batch=1000)) == one
    assert dump(build(base / "seven.sqlite", raws, batch=7)) == one
    db = sqlite3.connect(base / "one.sqlite")
    rows = {r[0]: r[1:] for r in db.execute(
        "SELECT workflow_id, name, state, result, reason FROM workflows")}
    assert rows["wd"][:3] == ("diamond", "succeeded", str(4**16))
    assert rows["wc"][1] == "succeeded" and '"manager_only"' in rows["wc"][2]
    assert rows["wt"][1] == "failed" and "failed" in rows["wt"][3]
    steps = dict(db.execute("SELECT step, state FROM workflow_steps WHERE workflow_id = 'wc'"))
    assert steps["manager_approval"] == "succeeded" and steps["auto_approve"] == "skipped"
    assert len(steps) == 6
    assert db.execute("SELECT name, version, steps FROM workflow_templates").fetchall() == [
        ("diamond", 1, 4)]
    assert db.execute("SELECT count(*) FROM projection_errors").fetchone() == (0,)
