"""The SQLite schema of the projections.

Bump :data:`SCHEMA_VERSION` on any change to a table or to what a row means: the projector
then rebuilds the file from the stream by itself, and the read commands refuse a file
from a newer jetflow with a clear message.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "DDL", "TABLE_DDL", "INDEX_DDL", "TABLES", "ProjectionError"]

SCHEMA_VERSION = 3  # 3: workflows, workflow templates, a job's workflow and step

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq INTEGER NOT NULL,     -- the last stream sequence applied
    last_at REAL,                  -- the latest event time seen (the view's "now")
    schema_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, queue TEXT, handler TEXT, priority INTEGER, state TEXT,
    attempt INTEGER, max_attempts INTEGER, worker TEXT, correlation_id TEXT, trace_id TEXT,
    submitted_at REAL, queued_at REAL, started_at REAL, finished_at REAL,
    result TEXT, error TEXT, last_seq INTEGER, events INTEGER, state_json TEXT NOT NULL,
    workflow_id TEXT, step TEXT    -- a workflow step's job: its workflow and step name
);
CREATE TABLE IF NOT EXISTS workflows (
    workflow_id TEXT PRIMARY KEY, name TEXT, version INTEGER, state TEXT, queue TEXT,
    correlation_id TEXT, context TEXT, started_at REAL, finished_at REAL, result TEXT,
    reason TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0, last_seq INTEGER
);
CREATE TABLE IF NOT EXISTS workflow_templates (
    name TEXT, version INTEGER, sha256 TEXT, steps INTEGER, label TEXT, description TEXT,
    registered_at REAL, seq INTEGER, PRIMARY KEY (name, version)
);
-- each step of a workflow that has begun (its job submitted, or skipped)
CREATE VIEW IF NOT EXISTS workflow_steps AS
    SELECT workflow_id, step, job_id, handler, state, attempt AS attempts, started_at,
           finished_at, result, error FROM jobs WHERE workflow_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS queue_states (
    queue TEXT, state TEXT, jobs INTEGER NOT NULL, PRIMARY KEY (queue, state)
);
CREATE TABLE IF NOT EXISTS queue_depth (
    queue TEXT, priority INTEGER, jobs INTEGER NOT NULL, PRIMARY KEY (queue, priority)
);
CREATE TABLE IF NOT EXISTS throughput (
    queue TEXT, minute INTEGER, succeeded INTEGER NOT NULL, failed INTEGER NOT NULL,
    dead_lettered INTEGER NOT NULL, PRIMARY KEY (queue, minute)
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, host TEXT, pid INTEGER, handlers TEXT, queues TEXT,
    concurrency INTEGER, status TEXT, joined_at REAL, left_at REAL, reason TEXT,
    succeeded INTEGER NOT NULL, failed INTEGER NOT NULL, last_seq INTEGER
);
CREATE TABLE IF NOT EXISTS timeline (
    seq INTEGER PRIMARY KEY, kind TEXT, entity_id TEXT, type TEXT, at REAL, body TEXT
);
CREATE TABLE IF NOT EXISTS projection_errors (
    seq INTEGER PRIMARY KEY, subject TEXT, code TEXT, reason TEXT, raw TEXT
);
"""

# Secondary indexes, for the read commands. A replay builds them once at the end (one
# sort each), not row by row: on a 1M-event rebuild that is ~15% of the write time.
INDEX_DDL = """
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (queue, queued_at) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (worker) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS timeline_by_entity ON timeline (entity_id, seq);
CREATE INDEX IF NOT EXISTS jobs_by_workflow ON jobs (workflow_id) WHERE workflow_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS workflows_by_state ON workflows (state, started_at);
"""
DDL = TABLE_DDL + INDEX_DDL

# Every table and its key columns, in the order `replay --verify` compares them.
TABLES: dict[str, tuple[str, ...]] = {
    "checkpoint": ("id",),
    "jobs": ("job_id",),
    "queue_states": ("queue", "state"),
    "queue_depth": ("queue", "priority"),
    "throughput": ("queue", "minute"),
    "workers": ("worker_id",),
    "workflows": ("workflow_id",),
    "workflow_templates": ("name", "version"),
    "timeline": ("seq",),
    "projection_errors": ("seq",),
}


class ProjectionError(RuntimeError):
    """A projection file that cannot be used (missing, from another schema, unreadable);
    the message says what to do."""
