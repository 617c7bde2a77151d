"""The SQLite schema of the projections. Bump SCHEMA_VERSION on any change: the
projector then rebuilds the file from the stream by itself."""

from __future__ import annotations

SCHEMA_VERSION = 1

DDL = """
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq INTEGER NOT NULL,
    schema_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, queue TEXT, handler TEXT, priority INTEGER, state TEXT,
    attempt INTEGER, max_attempts INTEGER, worker TEXT, correlation_id TEXT,
    submitted_at REAL, started_at REAL, finished_at REAL, result TEXT, error TEXT,
    last_seq INTEGER, state_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (queue, state, priority);
CREATE TABLE IF NOT EXISTS timeline (
    seq INTEGER PRIMARY KEY, kind TEXT, entity_id TEXT, type TEXT, at REAL, data TEXT
);
CREATE INDEX IF NOT EXISTS timeline_by_entity ON timeline (entity_id, seq);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, host TEXT, pid INTEGER, handlers TEXT, queues TEXT,
    concurrency INTEGER, status TEXT, joined_at REAL, left_at REAL, last_seq INTEGER
);
CREATE TABLE IF NOT EXISTS projection_errors (
    seq INTEGER PRIMARY KEY, subject TEXT, reason TEXT, raw TEXT
);
"""
