"""The job state machine: legal and illegal moves, terminal states, attempt numbering,
and properties over arbitrary event sequences."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from jetflow.core.events import FIELDS, JOB_EVENTS, Event
from jetflow.core.job import (
    ACTIVE,
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    JobState,
    apply,
    as_fields,
    fold,
    from_fields,
)
from jetflow.core.job import step as step_fields

JOB = "job-1"
NEW = "new"
STATES = sorted({NEW} | ACTIVE | TERMINAL)
ABSORBING = sorted(TERMINAL - {"dead_lettered"})

# event type -> the state it leads to (None: the state does not change)
TARGET: dict[str, str | None] = {
    "submitted": "submitted",
    "rejected": "rejected",
    "queued": "queued",
    "started": "running",
    "progress": None,
    "handed_back": "queued",
    "succeeded": "succeeded",
    "failed": "failed",
    "timed_out": "timed_out",
    "retry_scheduled": "retry_wait",
    "dead_lettered": "dead_lettered",
    "cancel_requested": None,
    "cancelled": "cancelled",
    "skipped": "skipped",
}

# the attempt an event must carry, given the job's current attempt
NEXT_ATTEMPT = {"queued", "started", "retry_scheduled"}
SAME_ATTEMPT = {"progress", "succeeded", "failed", "timed_out", "handed_back"}
# the events whose attempt apply() checks (retry_scheduled and timed_out are not checked)
CHECKED_ATTEMPT = {"queued", "started", "progress", "succeeded", "failed", "handed_back"}


def data_for(type_: str, attempt: int, worker: str = "w1") -> dict[str, Any]:
    return {
        "submitted": {"queue": "default", "handler": "echo", "args": {"x": 1}, "priority": 5,
                      "max_attempts": 3, "timeout_s": 30.0, "correlation_id": "corr-1"},
        "rejected": {"reason": "unknown handler 'nope'", "code": "unknown_handler",
                     "queue": "default"},
        "queued": {"attempt": attempt},
        "started": {"attempt": attempt, "worker": worker, "lease_s": 15.0},
        "progress": {"attempt": attempt, "pct": 50},
        "handed_back": {"attempt": attempt, "worker": worker, "reason": "draining"},
        "succeeded": {"attempt": attempt, "worker": worker, "result": {"ok": True}},
        "failed": {"attempt": attempt, "error_type": "ValueError", "message": "boom",
                   "retryable": True},
        "retry_scheduled": {"attempt": attempt, "not_before": 1000.0},
        "timed_out": {"attempt": attempt, "reason": "lease expired"},
        "dead_lettered": {"reason": "gave up"},
        "cancel_requested": {},
        "cancelled": {"reason": "user"},
        "skipped": {"reason": "branch not taken"},
    }[type_]


def right_attempt(type_: str, state: JobState) -> int:
    return state.attempt + 1 if type_ in NEXT_ATTEMPT else state.attempt


def event(type_: str, state: JobState, seq: int, at: float | None = None,
          attempt: int | None = None) -> Event:
    """A well-formed event of ``type_`` that fits ``state`` (unless ``attempt`` is forced)."""
    n = right_attempt(type_, state) if attempt is None else attempt
    data = data_for(type_, n)
    if type_ == "queued" and state.state == "running":
        data["handback"] = True  # the only way a running job is queued again
    return Event("job", state.job_id, type_, float(seq) if at is None else at, data, seq=seq)


# A realistic prefix of events that brings a job into each state.
PATHS: dict[str, list[str]] = {
    NEW: [],
    "submitted": ["submitted"],
    "rejected": ["rejected"],
    "skipped": ["submitted", "skipped"],
    "queued": ["submitted", "queued"],
    "running": ["submitted", "queued", "started", "progress"],
    "succeeded": ["submitted", "queued", "started", "succeeded"],
    "failed": ["submitted", "queued", "started", "failed"],
    "timed_out": ["submitted", "queued", "started", "timed_out"],
    "retry_wait": ["submitted", "queued", "started", "failed", "retry_scheduled"],
    "dead_lettered": ["submitted", "queued", "started", "failed", "dead_lettered"],
    "cancelled": ["submitted", "queued", "cancel_requested", "cancelled"],
}


def build(path: list[str]) -> tuple[JobState, list[Event]]:
    state = JobState(JOB)
    events = []
    for i, type_ in enumerate(path, start=1):
        e = event(type_, state, seq=i)
        state = apply(state, e)
        events.append(e)
    return state, events


def state_in(name: str) -> JobState:
    state, events = build(PATHS[name])
    assert state.state == name
    assert fold(events, JOB) == state
    return state


def test_helpers_cover_the_vocabulary() -> None:
    assert set(TRANSITIONS) == JOB_EVENTS == set(TARGET)
    assert set(PATHS) == set(STATES)
    assert ACTIVE.isdisjoint(TERMINAL)
    for allowed in TRANSITIONS.values():
        assert allowed <= set(STATES)
    for type_, fields in FIELDS["job"].items():
        assert set(fields) <= set(data_for(type_, 1)), type_


@pytest.mark.parametrize(
    ("type_", "from_state"),
    sorted((t, s) for t, allowed in TRANSITIONS.items() for s in allowed),
)
def test_legal_transition_is_accepted(type_: str, from_state: str) -> None:
    before = state_in(from_state)
    after = apply(before, event(type_, before, seq=before.last_seq + 1))
    assert after.state == (TARGET[type_] or before.state)
    assert after.events == before.events + 1
    assert after.last_seq == before.last_seq + 1
    assert after.attempt >= before.attempt


@pytest.mark.parametrize(
    ("type_", "from_state"),
    sorted((t, s) for t, allowed in TRANSITIONS.items() for s in STATES if s not in allowed),
)
def test_illegal_transition_is_refused(type_: str, from_state: str) -> None:
    before = state_in(from_state)
    with pytest.raises(IllegalTransition) as info:
        apply(before, event(type_, before, seq=before.last_seq + 1))
    assert info.value.state == from_state
    assert info.value.event_type == type_
    assert from_state in str(info.value) and type_ in str(info.value)


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(IllegalTransition, match="unknown job event"):
        apply(JobState(JOB), Event("job", JOB, "exploded", 1.0, {}))


@pytest.mark.parametrize("terminal", ABSORBING)
def test_terminal_state_absorbs_every_event(terminal: str) -> None:
    state = state_in(terminal)
    assert state.terminal
    for type_ in sorted(JOB_EVENTS):
        with pytest.raises(IllegalTransition):
            apply(state, event(type_, state, seq=state.last_seq + 1))


def test_dead_lettered_accepts_only_a_manual_redrive() -> None:
    dead = state_in("dead_lettered")
    assert dead.terminal
    for type_ in sorted(JOB_EVENTS - {"queued"}):
        with pytest.raises(IllegalTransition):
            apply(dead, event(type_, dead, seq=dead.last_seq + 1))
    # re-drive: queued for the next attempt, then it runs again as attempt 2
    queued = apply(dead, event("queued", dead, seq=10))
    assert queued.state == "queued" and not queued.terminal
    assert queued.attempt == dead.attempt == 1
    running = apply(queued, event("started", queued, seq=11))
    assert running.state == "running" and running.attempt == 2
    done = apply(running, event("succeeded", running, seq=12))
    assert done.state == "succeeded" and done.attempt == 2
    # the re-drive must still number the attempt correctly
    with pytest.raises(IllegalTransition):
        apply(dead, event("queued", dead, seq=10, attempt=dead.attempt))


def test_submitted_records_the_submission() -> None:
    state = state_in("submitted")
    assert (state.queue, state.handler, state.args, state.priority, state.max_attempts) == \
        ("default", "echo", {"x": 1}, 5, 3)
    assert (state.timeout_s, state.correlation_id, state.submitted_at) == (30.0, "corr-1", 1.0)
    assert state.attempt == 0 and state.worker is None


def test_rejected_keeps_code_and_reason() -> None:
    state = state_in("rejected")
    assert state.error == {"type": "rejected", "code": "unknown_handler",
                           "message": "unknown handler 'nope'"}
    assert state.queue == "default"


def test_a_full_retry_lifecycle() -> None:
    path = ["submitted", "queued", "started", "failed", "retry_scheduled", "queued", "started",
            "timed_out", "retry_scheduled", "queued", "started", "succeeded"]
    state, events = build(path)
    assert state.state == "succeeded"
    assert state.attempt == 3
    assert state.worker == "w1"
    assert state.result == {"ok": True}
    assert state.finished_at == 12.0 and state.started_at == 11.0
    assert state.events == len(path) and state.last_seq == len(path)
    assert fold(events) == state


def test_started_must_be_the_next_attempt() -> None:
    queued = state_in("queued")
    for wrong in (0, 2, 5):
        with pytest.raises(IllegalTransition, match="attempt"):
            apply(queued, event("started", queued, seq=9, attempt=wrong))
    running = apply(queued, event("started", queued, seq=9, attempt=1))
    assert running.attempt == 1 and running.worker == "w1" and running.lease_s == 15.0


def test_queued_must_announce_the_next_attempt() -> None:
    submitted = state_in("submitted")
    for wrong in (0, 2):
        with pytest.raises(IllegalTransition):
            apply(submitted, event("queued", submitted, seq=9, attempt=wrong))
    retry = state_in("retry_wait")
    with pytest.raises(IllegalTransition):
        apply(retry, event("queued", retry, seq=9, attempt=retry.attempt))
    assert apply(retry, event("queued", retry, seq=9)).state == "queued"


@pytest.mark.parametrize("type_", ["succeeded", "failed", "progress"])
def test_outcome_must_match_the_running_attempt(type_: str) -> None:
    running = state_in("running")
    assert running.attempt == 1
    for wrong in (0, 2):
        with pytest.raises(IllegalTransition, match="attempt"):
            apply(running, event(type_, running, seq=9, attempt=wrong))
    assert apply(running, event(type_, running, seq=9, attempt=1)).attempt == 1


def test_a_stale_outcome_after_a_retry_is_refused() -> None:
    state, _ = build(["submitted", "queued", "started", "timed_out", "retry_scheduled",
                      "queued", "started"])
    assert state.attempt == 2
    with pytest.raises(IllegalTransition):  # the first, lost attempt reports late
        apply(state, event("succeeded", state, seq=20, attempt=1))


def test_cancel_requested_only_flags() -> None:
    running = state_in("running")
    flagged = apply(running, event("cancel_requested", running, seq=9))
    assert flagged.state == "running" and flagged.cancel_requested
    again = apply(flagged, event("cancel_requested", flagged, seq=10))
    assert again.cancel_requested and again.events == flagged.events + 1


def test_apply_does_not_mutate_its_input() -> None:
    before = state_in("queued")
    copy = JobState(**{f: getattr(before, f) for f in before.__dataclass_fields__})
    apply(before, event("started", before, seq=9))
    assert before == copy


def test_fold_of_nothing() -> None:
    assert fold([], JOB) == JobState(JOB)
    with pytest.raises(ValueError):
        fold([])


def test_last_seq_never_goes_back() -> None:
    state = JobState(JOB)
    state = apply(state, event("submitted", state, seq=50))
    state = apply(state, event("queued", state, seq=7))  # seq 0 or out of order
    assert state.last_seq == 50


# -- properties --------------------------------------------------------------------------

PROPERTY = settings(max_examples=200, deadline=None)

# The move a healthy system makes next in each state, so that random runs get deep.
HAPPY: dict[str, tuple[str, ...]] = {
    NEW: ("submitted",), "submitted": ("queued",), "queued": ("started",),
    "running": ("failed", "failed", "timed_out", "succeeded"),
    "failed": ("retry_scheduled",), "timed_out": ("retry_scheduled",),
    "retry_wait": ("queued",), "dead_lettered": ("queued",),
}
ALL_TYPES = sorted(JOB_EVENTS)

# One step: how to pick the event type ("happy" move, any "legal" one, "any" type at all),
# an index to pick with, and how far the event's attempt is from the right one.
step = st.tuples(st.sampled_from(["happy"] * 8 + ["legal", "any"]),
                st.integers(0, 1000),
                st.sampled_from([0, 0, 0, 0, 0, 0, -1, 1, 2]))
# short runs shrink well; long ones reach retries and re-drives
steps = st.lists(step, max_size=50) | st.lists(step, min_size=20, max_size=50)


def pick(mode: str, index: int, state: JobState) -> str:
    if mode == "happy" and state.state in HAPPY:
        moves = HAPPY[state.state]
        return moves[index % len(moves)]
    if mode == "legal":
        legal = [t for t in ALL_TYPES if state.state in TRANSITIONS[t]]
        if legal:
            return legal[index % len(legal)]
    return ALL_TYPES[index % len(ALL_TYPES)]


def check_valid(state: JobState) -> None:
    assert state.state in STATES
    assert state.attempt >= 0
    if state.state == "running":
        assert state.worker is not None and state.attempt >= 1
    if state.state in ("succeeded", "failed"):
        assert state.attempt >= 1
    if state.state == "retry_wait":
        assert state.not_before is not None
    if state.state not in (NEW, "skipped"):  # a workflow may skip a job never submitted
        assert state.submitted_at is not None


def run(seq_steps: list[tuple[str, int, int]]) -> tuple[list[Event], list[JobState]]:
    """Apply every step; return the accepted events and the state after every step
    (``history[0]`` is the empty state; a refused step repeats the state before it)."""
    state = JobState(JOB)
    accepted: list[Event] = []
    history = [state]
    for i, (mode, index, offset) in enumerate(seq_steps, start=1):
        type_ = pick(mode, index, state)
        e = event(type_, state, seq=i, attempt=right_attempt(type_, state) + offset)
        allowed = state.state in TRANSITIONS[type_]
        try:
            new = apply(state, e)
        except IllegalTransition:
            history.append(state)  # refused: the state stays as it was
            continue
        assert allowed, f"{type_} accepted in {state.state}"
        if type_ in CHECKED_ATTEMPT:
            assert offset == 0, f"{type_} accepted with a wrong attempt"
        check_valid(new)
        accepted.append(e)
        state = new
        history.append(state)
    return accepted, history


def test_random_runs_get_deep() -> None:
    """Guards the generator: the properties below see retries, not only the first step."""
    seen: set[str] = set()
    attempts = 0

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(steps)
    def explore(seq_steps: list[tuple[str, int, int]]) -> None:
        nonlocal attempts
        _, history = run(seq_steps)
        seen.update(s.state for s in history)
        attempts = max(attempts, history[-1].attempt)

    explore()
    assert seen == set(STATES)
    assert attempts >= 3


@PROPERTY
@given(steps)
def test_any_sequence_leaves_a_valid_state_or_is_refused(
        seq_steps: list[tuple[str, int, int]]) -> None:
    _, history = run(seq_steps)  # run() checks every accepted step
    for state in history:
        check_valid(state)


@PROPERTY
@given(steps)
def test_attempt_never_decreases(seq_steps: list[tuple[str, int, int]]) -> None:
    _, history = run(seq_steps)
    attempts = [s.attempt for s in history]
    assert attempts == sorted(attempts)
    assert all(b - a <= 1 for a, b in zip(attempts, attempts[1:], strict=False))


@PROPERTY
@given(steps)
def test_terminal_states_absorb(seq_steps: list[tuple[str, int, int]]) -> None:
    _, history = run(seq_steps)
    for before, after in zip(history, history[1:], strict=False):
        if before.state in ABSORBING:
            assert after is before
        if before.state == "dead_lettered" and after is not before:
            assert after.state == "queued"


@PROPERTY
@given(steps)
def test_fold_equals_applying_one_by_one(seq_steps: list[tuple[str, int, int]]) -> None:
    accepted, history = run(seq_steps)
    final = history[-1]
    assert fold(accepted, JOB) == final
    assert final.events == len(accepted)
    if accepted:
        assert fold(accepted) == final
    # every prefix of the log folds to the state the job had at that point
    distinct = [s for before, s in zip(history, history[1:], strict=False) if s is not before]
    assert len(distinct) == len(accepted)
    for n, expected in enumerate(distinct, start=1):
        assert fold(accepted[:n], JOB) == expected


@PROPERTY
@given(steps, st.data())
def test_step_changes_the_fields_as_apply_does_or_not_at_all(
        seq_steps: list[tuple[str, int, int]], data: st.DataObject) -> None:
    """The projector's in-place fold path: the same result as ``apply``; on any error
    (an illegal move, a field missing from a forged event) the fields stay as they were."""
    state = JobState(JOB)
    values = as_fields(state)
    for i, (mode, index, offset) in enumerate(seq_steps, start=1):
        type_ = pick(mode, index, state)
        e = event(type_, state, seq=i, attempt=right_attempt(type_, state) + offset)
        if e.data and data.draw(st.integers(0, 9)) == 0:  # a forged event lacking a field
            gone = data.draw(st.sampled_from(sorted(e.data)))
            e = Event(e.kind, e.id, e.type, e.at, {k: v for k, v in e.data.items()
                                                   if k != gone}, seq=e.seq)
        before = dict(values)
        try:
            expected = apply(state, e)
        except Exception as exc:  # noqa: BLE001 - whatever apply raises, step raises too
            with pytest.raises(type(exc)):
                step_fields(values, e)
            assert values == before
            continue
        step_fields(values, e)
        assert from_fields(values) == expected and list(values) == list(before)
        state = expected


class JobLifecycle(RuleBasedStateMachine):
    """Drives one job with well-formed and malformed events; the model is the log."""

    def __init__(self) -> None:
        super().__init__()
        self.state = JobState(JOB)
        self.log: list[Event] = []
        self.seq = 0

    def _try(self, type_: str, offset: int = 0) -> None:
        self.seq += 1
        e = event(type_, self.state, seq=self.seq,
                  attempt=right_attempt(type_, self.state) + offset)
        before = self.state
        try:
            self.state = apply(before, e)
        except IllegalTransition:
            assert before.state not in TRANSITIONS[type_] or offset != 0
            return
        self.log.append(e)
        assert before.state in TRANSITIONS[type_]
        assert offset == 0 or type_ not in CHECKED_ATTEMPT
        assert self.state.attempt >= before.attempt
        if before.state in ABSORBING:
            raise AssertionError(f"{type_} applied in terminal state {before.state}")

    @rule(type_=st.sampled_from(sorted(JOB_EVENTS)))
    def well_formed(self, type_: str) -> None:
        self._try(type_)

    @rule(type_=st.sampled_from(sorted(NEXT_ATTEMPT | SAME_ATTEMPT)),
          offset=st.sampled_from([-1, 1, 3]))
    def wrong_attempt(self, type_: str, offset: int) -> None:
        self._try(type_, offset)

    @rule(index=st.integers(0, 3))
    def happy_step(self, index: int) -> None:
        """The move a healthy system would make next, so that runs get deep."""
        self._try(pick("happy", index, self.state))

    @invariant()
    def valid(self) -> None:
        check_valid(self.state)

    @invariant()
    def log_replays_to_state(self) -> None:
        assert fold(self.log, JOB) == self.state


JobLifecycle.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                          deadline=None)
TestJobLifecycle = JobLifecycle.TestCase


def test_running_job_is_queued_again_only_as_a_hand_back() -> None:
    running = state_in("running")
    plain = Event("job", running.job_id, "queued", 99.0, {"attempt": running.attempt + 1},
                  seq=running.last_seq + 1)
    with pytest.raises(IllegalTransition, match="hand-back"):
        apply(running, plain)
    back = apply(running, Event("job", running.job_id, "queued", 99.0,
                                {"attempt": running.attempt + 1, "handback": True},
                                seq=running.last_seq + 1))
    assert back.state == "queued" and back.max_attempts == running.max_attempts + 1


def test_redrive_sets_a_new_budget() -> None:
    dead = state_in("dead_lettered")
    again = apply(dead, Event("job", dead.job_id, "queued", 99.0,
                              {"attempt": dead.attempt + 1, "max_attempts": dead.attempt + 2},
                              seq=dead.last_seq + 1))
    assert again.state == "queued" and again.max_attempts == dead.attempt + 2


@pytest.mark.parametrize("type_", ["progress", "succeeded", "failed", "handed_back"])
def test_an_outcome_from_a_worker_that_does_not_hold_the_claim_is_refused(type_: str) -> None:
    running = state_in("running")
    assert running.worker == "w1"
    forged = Event("job", JOB, type_, 2.0, {**data_for(type_, running.attempt, "w2"),
                                             "worker": "w2"}, seq=running.last_seq + 1)
    with pytest.raises(IllegalTransition, match="worker w2, which does not hold the claim"):
        apply(running, forged)
    own = Event("job", JOB, type_, 2.0, {**data_for(type_, running.attempt), "worker": "w1"},
                seq=running.last_seq + 1)
    assert apply(running, own).events == running.events + 1


def test_a_worker_s_run_timeout_must_be_the_holder_s_and_the_sentinel_s_need_not() -> None:
    running = state_in("running")
    mine = {"attempt": running.attempt, "reason": "run over 1s", "kind": "run"}
    with pytest.raises(IllegalTransition, match="does not hold the claim"):
        apply(running, Event("job", JOB, "timed_out", 2.0, {**mine, "worker": "w2"}))
    assert apply(running, Event("job", JOB, "timed_out", 2.0,
                                {**mine, "worker": "w1"})).state == "timed_out"
    assert apply(running, Event("job", JOB, "timed_out", 2.0,
                                {**mine, "kind": "lease"})).state == "timed_out"


def test_a_hand_back_queues_the_next_attempt_without_using_the_budget() -> None:
    running = state_in("running")
    back = apply(running, Event("job", JOB, "handed_back", 2.0,
                                {"attempt": running.attempt, "worker": "w1"}, seq=90))
    assert (back.state, back.worker, back.attempt) == ("queued", None, running.attempt)
    assert back.max_attempts == running.max_attempts + 1
    again = apply(back, Event("job", JOB, "started", 3.0, {
        "attempt": running.attempt + 1, "worker": "w2", "lease_s": 15.0}, seq=91))
    assert again.worker == "w2"
