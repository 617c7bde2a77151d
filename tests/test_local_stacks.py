"""The registry of secured local stacks (no server): a command finds a live stack's data
directory by its port, and never a dead one's, nor one whose pid another process took."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jetflow.adapters import local_stacks


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JETFLOW_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def test_a_live_stack_is_found_by_its_port_and_forgotten_when_it_stops(tmp_path: Path) -> None:
    entry = local_stacks.register("nats://127.0.0.1:4999", tmp_path / "data")
    assert entry is not None and oct(entry.stat().st_mode & 0o777) == "0o600"
    assert local_stacks.find("nats://localhost:4999") == tmp_path / "data"
    assert local_stacks.find("nats://127.0.0.1:4998") is None
    assert local_stacks.find("nats://example.org:4999") is None  # not this machine
    local_stacks.unregister(entry)
    assert local_stacks.find("nats://127.0.0.1:4999") is None


def test_an_entry_whose_pid_is_another_process_now_is_not_trusted(tmp_path: Path) -> None:
    entry = local_stacks.register("nats://127.0.0.1:4999", tmp_path / "data")
    assert entry is not None
    doc = json.loads(entry.read_text())
    entry.write_text(json.dumps({**doc, "started": (doc["started"] or 0) - 1}))
    assert local_stacks.find("nats://127.0.0.1:4999") is None  # same pid, another start
    entry.write_text(json.dumps({**doc, "pid": 2**22 + 7}))  # no such process
    assert local_stacks.find("nats://127.0.0.1:4999") is None
